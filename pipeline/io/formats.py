"""Input files at the byte level (no paddle): suffixes, file listing, headers, raw records.

Formats, chosen by suffix: `.tsv` (tab-separated; quoting per file, see below), `.csv`
(standard quoting, a record may span lines), `.jsonl`/`.ndjson` (one object per line) and
`.parquet`; the three text formats may also be gzipped (`.tsv.gz` ...). A JSONL file's first
object plays the role of a header: its keys say which columns the file has. Blank lines are
skipped in every text format; they count as lines, not as rows.

TSV quoting (`--tsv-quoting`, `TSV_QUOTING`): `none` reads a TSV literally, one record per line,
quotes are text (raw dumps such as MS MARCO's collection.tsv). `csv` reads it with Python's csv
module (tab delimiter, `"` quotes, doubled quotes inside; a quoted field may hold tabs and line
breaks, so a record - the header too - may span lines; strict: a record that cannot be parsed is
rejected). `auto` (the default) decides per file, before any row is read, from a scan of the whole
file. The rule: csv.writer and pandas (QUOTE_MINIMAL) quote a field exactly when it holds a quote,
a tab or a line break, wrap it in quotes and double the quotes inside. The scan splits the file
into fields the way csv.reader does; a *well-formed quoted field* starts with `"`, ends with a `"`
followed by a tab or the end of the record, and holds only doubled quotes in between.
  - CSV evidence: a well-formed quoted field holding a doubled quote, a tab, a CR or a line break
    (it spans physical lines) - something that forced its quoting - in a record that has as many
    fields as line 1 has tab-separated fields and, if it spans physical lines, not all of whose
    lines hold exactly as many tabs as line 1. (When every line of such a record is a whole
    literal record, the quotes only pair up by accident - an opening quote in one raw line, a
    closing one at the end of a field lines later - and they are literal evidence instead; so
    are the quoted fields of a record with another field count.) Also CSV evidence: every field
    of the header record well-formed quoted, as QUOTE_ALL and QUOTE_NONNUMERIC writers write it.
  - Literal evidence: any other field holding a quote - a quote inside or after text
    (`the "best" one`), a closing quote followed by more text (`"Hello" he said`), an opening
    quote never closed.
  - Neutral: a well-formed quoted field with nothing that forced its quoting (`"Hello"`): only
    QUOTE_ALL-style writers produce it, and a raw text may well be exactly that.
  - Decision: CSV evidence and no literal evidence -> csv; otherwise -> none (literal evidence, or
    no evidence at all: neutral fields then keep their quotes, and the rule text says so). Both
    kinds -> InputError naming the line where each first occurs: pass --tsv-quoting csv or none.
Line numbers are those of the physical line where a record starts (as rows are numbered). The
scan is a bytes search: stretches without a `"` byte are skipped undecoded, only lines holding a
quote (or inside a quoted field) are parsed.

`inspect_file` finds a file's columns (and a TSV's quoting) before any row is read (or raises
InputError); `read_records` streams its records as raw values for `pipeline.io.validate` to check.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.io.rows import InputError, RowError

# A single 1 MB document must not abort a CSV file (the csv default limit is 128 KiB).
csv.field_size_limit(2**31 - 1)

_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_GZIP_FORMATS = ("tsv", "csv", "jsonl")
_SUPPORTED = ".tsv .csv .jsonl .ndjson .parquet, and .tsv.gz .csv.gz .jsonl.gz .ndjson.gz"
_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")
_READ_ERRORS = (OSError, EOFError, zlib.error)  # e.g. a disk error, a gzip file cut short
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}

TSV_QUOTING = ("auto", "csv", "none")  # --tsv-quoting (see the module docstring)
_QUOTE, _TAB, _CR = 0x22, 0x09, 0x0D
_QUOTED_BODY = re.compile(rb'(?:[^"]++|"")*+')  # inside a quoted field: up to its closing quote
_SCAN_BLOCK = 1 << 23  # bytes read at a time by the TSV quoting scan

# ----------------------------------------------------------------------------- files


def _format_of(path: str | Path) -> str | None:
    name = Path(path).name.lower()
    gzipped = name.endswith(".gz")
    fmt = _FORMATS.get(Path(name[:-3] if gzipped else name).suffix)
    return None if gzipped and fmt not in _GZIP_FORMATS else fmt


def detect_format(path: str | Path) -> str:
    """'tsv' | 'csv' | 'jsonl' | 'parquet', from the file name (a `.gz` suffix is looked through)."""
    fmt = _format_of(path)
    if fmt is None:
        raise InputError(f"{path}: unsupported file type; supported: {_SUPPORTED}")
    return fmt


def list_input_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand folders (sorted, recursive, only supported suffixes), keep file order as given.

    A file reached twice (named twice, or also inside a named folder) is kept once: reading it
    again would only reject all its rows as duplicates."""
    out: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(p))
        elif path.exists():
            detect_format(path)
            found = [path]
        else:
            raise InputError(f"{path}: no such file or folder")
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
    if not out:
        where = f" in {', '.join(str(p) for p in paths)}" if paths else ""
        raise InputError(f"no input files found{where} (supported: {_SUPPORTED})")
    return out


def _open_binary(path: Path) -> BinaryIO:
    """The file's bytes (gunzipped for .gz), positioned after a UTF-8 BOM if there is one."""
    f = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    try:
        if f.read(len(_BOM)) != _BOM:
            f.seek(0)
    except BaseException:
        f.close()
        raise
    return f


class _DecodedLines:
    """Physical lines of a binary stream as text, for csv.reader.

    A line that is not UTF-8 is decoded with surrogateescape (so csv can still find where its
    record ends) and remembered, so the record holding it is rejected rather than its bytes
    silently replaced."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.number = 0  # lines handed out so far
        self.last_bad = 0  # number of the last line that was not UTF-8 (0: none)

    def __iter__(self) -> _DecodedLines:
        return self

    def __next__(self) -> str:
        raw = next(self.stream)
        self.number += 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.last_bad = self.number
            return raw.decode("utf-8", "surrogateescape")


def _tsv_header(path: Path, f: BinaryIO) -> list[str]:
    raw = f.readline()
    if not raw:
        raise InputError(f"{path}: empty file (no content)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: line 1 (header) is not valid UTF-8 (byte {e.start})") from e
    return [c.strip() for c in text.rstrip("\r\n").split("\t")]


def _csv_reader(lines: _DecodedLines, tsv: bool) -> Iterator[list[str]]:
    """csv.reader for a .csv file, or for a TSV read with --tsv-quoting csv (strict there: a
    quote followed by text, or a quoted field never closed, rejects its record)."""
    return csv.reader(lines, delimiter="\t", strict=True) if tsv else csv.reader(lines)


def _csv_error(e: csv.Error) -> str:
    return str(e).replace("\t", "\\t")  # "'\t' expected after '"'": no raw tab in rejects.tsv


def _csv_header(path: Path, lines: _DecodedLines, reader: Iterator[list[str]], kind: str = "CSV") -> list[str]:
    try:
        names = next(reader)
    except StopIteration:
        raise InputError(f"{path}: empty file (no content)") from None
    except csv.Error as e:
        raise InputError(f"{path}: line 1 (header) is not valid {kind}: {_csv_error(e)}") from e
    if lines.last_bad:
        raise InputError(f"{path}: line {lines.last_bad} (header) is not valid UTF-8")
    return [c.strip() for c in names]


# ----------------------------------------------------------------------------- inspection


@dataclass(frozen=True)
class Layout:
    """What a file offers, found before any row is read."""

    fmt: str
    columns: list[str]  # column names (JSONL: keys of the first object)
    where: str  # where the names come from, for messages
    tsv_quoting: str | None = None  # TSV: how it is read, "csv" | "none"; None for other formats
    tsv_quoting_rule: str = ""  # TSV: why, e.g. "auto: no field holds a quote" or "--tsv-quoting csv"


@dataclass(frozen=True)
class TsvQuoting:
    """How one TSV file is read, for report.json: `mode` "csv" | "none", `rule` why, in words."""

    mode: str
    rule: str

    @staticmethod
    def of(files: Sequence[Path], layouts: Sequence[Layout]) -> dict[str, TsvQuoting]:
        """{path as given: TsvQuoting} for the TSV files among `files`."""
        return {str(p): TsvQuoting(lay.tsv_quoting, lay.tsv_quoting_rule)
                for p, lay in zip(files, layouts) if lay.tsv_quoting}


def check_tsv_quoting(value: str) -> str:
    """`value` if it is one of TSV_QUOTING, else ValueError naming the allowed values."""
    if value not in TSV_QUOTING:
        raise ValueError(f"tsv_quoting must be one of {', '.join(TSV_QUOTING)}, got {value!r}")
    return value


def inspect_file(path: Path, tsv_quoting: str = "auto") -> Layout:
    """Column names of a file, or InputError if the file cannot supply any row.

    For a TSV it also settles how the file is read (`tsv_quoting`: "auto" scans the whole file
    and applies the rule of the module docstring; "csv" or "none" is taken as given)."""
    check_tsv_quoting(tsv_quoting)
    fmt = detect_format(path)
    try:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: empty file (0 bytes)")
        if fmt == "parquet":
            return _inspect_parquet(path)
        quoting, rule = decide_tsv_quoting(path, tsv_quoting) if fmt == "tsv" else (None, "")
        with _open_binary(path) as f:
            if fmt == "jsonl":
                return _inspect_jsonl(path, f)
            if quoting == "none":
                columns = _tsv_header(path, f)
            else:
                lines = _DecodedLines(f)
                tsv = quoting == "csv"
                columns = _csv_header(path, lines, _csv_reader(lines, tsv), "CSV-quoted TSV" if tsv else "CSV")
            if not any(raw.strip() for raw in f):
                raise InputError(f"{path}: no data rows (the file holds a header line and nothing else)")
            return Layout(fmt, columns, "line 1 (header)", quoting, rule)
    except gzip.BadGzipFile as e:
        raise InputError(f"{path}: not a gzip file, although its name ends in .gz ({e})") from e
    except _READ_ERRORS as e:
        raise InputError(f"{path}: cannot read: {e}") from e


def _inspect_jsonl(path: Path, f: BinaryIO) -> Layout:
    """The first line holding a JSON object defines the file's keys. Lines before it are
    rejected later as rows; a file with no object at all is not JSON Lines."""
    first_problem: tuple[int, str] | None = None
    for number, raw in enumerate(f, 1):
        if raw.isspace():
            continue
        try:
            obj = _json_object(raw)
        except RowError as e:
            first_problem = first_problem or (number, e.reason)
            continue
        return Layout("jsonl", list(obj), f"line {number} (first JSON object)")
    if first_problem is None:
        raise InputError(f"{path}: empty file (no JSON lines)")
    number, reason = first_problem
    raise InputError(f"{path}: no line holds a JSON object, so this is not JSON Lines (line {number}: {reason})")


def _inspect_parquet(path: Path) -> Layout:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as pf:
            columns, rows = pf.schema_arrow.names, pf.metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file: {e}") from e
    if rows == 0:
        raise InputError(f"{path}: no data rows (the Parquet file holds 0 rows)")
    return Layout("parquet", columns, "Parquet schema")


# ----------------------------------------------------------------------------- TSV quoting


@dataclass
class QuoteEvidence:
    """What the `auto` scan of a TSV found (the rule is in the module docstring).

    Counts are fields; lines are the physical lines where the records holding them start."""

    csv_fields: int = 0  # CSV-quoted fields (quoting forced by a doubled quote, tab, CR or line break)
    literal_fields: int = 0  # fields whose quotes are text
    neutral_fields: int = 0  # well-formed quoted fields with nothing that forced the quotes
    header_quoted: bool = False  # every field of the header record well-formed quoted
    csv_line: int = 0  # first CSV-quoted field
    csv_what: str = ""
    literal_line: int = 0
    literal_what: str = ""
    neutral_line: int = 0

    def add_csv(self, line: int, fields: int, what: str) -> None:
        self.csv_fields += fields
        if not self.csv_line:
            self.csv_line, self.csv_what = line, what

    def add_literal(self, line: int, fields: int, what: str) -> None:
        self.literal_fields += fields
        if not self.literal_line:
            self.literal_line, self.literal_what = line, what


class _QuoteScan:
    """Splits physical lines into fields the way csv.reader does (tab, `"`, doubled quotes) and
    classifies each record's quoted fields as it ends. Fed only the lines that hold a quote or
    lie inside a quoted field; the others cannot change the outcome."""

    def __init__(self, tabs: int):
        self.tabs = tabs  # tabs on line 1: a record has tabs + 1 fields
        self.evidence = QuoteEvidence()
        self.open = False  # inside a quoted field at the end of the last line seen
        self.line = 0  # where the current record starts
        self.fields = self.forced = self.neutral = self.literal = 0
        self.forced_what = self.literal_what = ""
        self.unquoted = False  # a field of the record is not well-formed quoted
        self.multi = False  # the record spans physical lines
        self.whole = True  # each of its lines holds exactly `tabs` tabs (is a whole literal record)
        self.body = 0  # where the open field's text starts (this block)
        self.spans = False  # the open field spans physical lines

    def inside(self, data: bytes, start: int, stop: int, count: int) -> None:
        """`count` whole lines data[start:stop] without a quote, inside the open quoted field."""
        self.multi = self.spans = True
        if self.whole:
            tabs = data.count(b"\t", start, stop)
            self.whole = tabs == count * self.tabs and (
                not tabs or all(x.count(b"\t") == self.tabs for x in data[start:stop - 1].split(b"\n")))

    def text_quotes(self, data: bytes, start: int, stop: int, number: int) -> None:
        """Line `number`, data[start:stop], starts a record and holds quotes, none of them at the
        start of a field: what `feed` would find, faster - each field holding one is literal."""
        first, last = data.find(b'"', start, stop), data.rfind(b'"', start, stop)
        if data.find(b"\t", first, last) < 0:  # all in one field (the usual case)
            literal = 1
        else:
            literal = sum(b'"' in field for field in data[start:stop].split(b"\t"))
        self.evidence.add_literal(number, literal, "a quote inside a field's text")

    def feed(self, data: bytes, start: int, stop: int, number: int) -> None:
        """Physical line `number`, data[start:stop] (stop: its newline)."""
        whole = data.count(b"\t", start, stop) == self.tabs
        if self.open:
            self.multi = self.spans = True
            self.whole = self.whole and whole
        else:
            self.line, self.whole, self.multi = number, whole, False
            self.fields = self.forced = self.neutral = self.literal = 0
            self.forced_what = self.literal_what = ""
            self.unquoted = False
        end = stop
        while end > start and data[end - 1] == _CR:
            end -= 1
        p = start
        while True:
            if self.open:
                close = _QUOTED_BODY.match(data, p, end).end()
                if close >= end:
                    return  # the field goes on past this line
                self.open = False
                after = close + 1
                if after < end and data[after] != _TAB:  # "Hello" he said: csv.reader reads on to the tab
                    self._literal("a closing quote followed by text")
                    tab = data.find(b"\t", after, end)
                    if tab < 0:
                        return self._end()
                    p = tab + 1
                    continue
                self._quoted(data, close)
                if after >= end:
                    return self._end()
                p = after + 1
            elif p < end and data[p] == _QUOTE:
                self.open, self.body, self.spans = True, p + 1, False
                p += 1
            else:
                tab = data.find(b"\t", p, end)
                if data.find(b'"', p, end if tab < 0 else tab) >= 0:
                    self._literal("a quote inside a field's text")
                else:
                    self.fields += 1
                    self.unquoted = True
                if tab < 0:
                    return self._end()
                p = tab + 1

    def _quoted(self, data: bytes, close: int) -> None:
        """A well-formed quoted field, its closing quote at `close`."""
        self.fields += 1
        what = "a line break" if self.spans else next(
            (name for token, name in ((b'""', "a doubled quote"), (b"\t", "a tab"), (b"\r", "a CR"))
             if data.find(token, self.body, close) >= 0), "")
        if what:
            self.forced += 1
            self.forced_what = self.forced_what or what
        else:
            self.neutral += 1

    def _literal(self, what: str) -> None:
        self.fields += 1
        self.unquoted = True
        self.literal += 1
        self.literal_what = self.literal_what or what

    def _end(self) -> None:
        ev, line = self.evidence, self.line
        if self.forced:
            if self.fields != self.tabs + 1:
                ev.add_literal(line, self.forced, f"quotes that would pair up into a record of {self.fields} "
                                                  f"fields, not {self.tabs + 1}")
            elif self.multi and self.whole:
                ev.add_literal(line, self.forced, "an opening quote closed lines later, each line a whole "
                                                  "record: raw quotes pairing up by accident")
            else:
                ev.add_csv(line, self.forced, self.forced_what)
        if self.literal:
            ev.add_literal(line, self.literal, self.literal_what)
        if line == 1 and not self.unquoted:
            ev.header_quoted = True
        elif self.neutral:
            ev.neutral_fields += self.neutral
            ev.neutral_line = ev.neutral_line or line

    def finish(self) -> QuoteEvidence:
        if self.open:  # end of file inside a quoted field
            self.open = False
            self._literal("an opening quote never closed")
            self._end()
        return self.evidence


def _line_blocks(f: BinaryIO) -> Iterator[tuple[bytes, int]]:
    """(data, end): data[:end] is a run of whole lines, each ending in a newline (one is added
    to a last line without it); what follows `end` is carried into the next block."""
    carry = b""
    while True:
        block = f.read(_SCAN_BLOCK)
        if not block:
            if carry:
                yield carry + b"\n", len(carry) + 1
            return
        data = carry + block if carry else block
        end = data.rfind(b"\n", len(carry)) + 1
        if end:
            yield data, end
            carry = data[end:]
        else:
            carry = data


def scan_tsv_quotes(path: Path) -> QuoteEvidence:
    """Scans a whole TSV for the evidence of the module docstring's rule. Only the lines holding
    a `"` (or lying inside a quoted field) are parsed; the rest are skipped by bytes searches."""
    number = 1  # the line starting at `pos`
    scan: _QuoteScan | None = None
    try:
        with _open_binary(path) as f:
            for data, end in _line_blocks(f):
                if scan is None:
                    scan = _QuoteScan(data.count(b"\t", 0, data.find(b"\n")))
                pos = 0
                while pos < end:
                    q = data.find(b'"', pos, end)
                    start = end if q < 0 else (data.rfind(b"\n", pos, q) + 1 or pos)
                    if start > pos:  # whole lines without a quote
                        skipped = data.count(b"\n", pos, start)
                        if scan.open:
                            scan.inside(data, pos, start, skipped)
                        number += skipped
                    if q < 0:
                        break
                    stop = data.find(b"\n", q)
                    if scan.open or data[start] == _QUOTE or data.find(b'\t"', start, stop) >= 0:
                        scan.feed(data, start, stop, number)
                    else:
                        scan.text_quotes(data, start, stop, number)
                    number += 1
                    pos = stop + 1
    except gzip.BadGzipFile:
        raise
    except _READ_ERRORS as e:  # read in large blocks: no line number to give
        raise InputError(f"{path}: cannot read the whole file (scanning it for --tsv-quoting auto): {e}") from e
    return scan.finish() if scan else QuoteEvidence()


def _fields(n: int, kind: str = "") -> str:
    return f"{n} {kind}{' ' if kind else ''}field{'s' if n != 1 else ''}"


def decide_tsv_quoting(path: Path, tsv_quoting: str = "auto") -> tuple[str, str]:
    """(mode, rule): how to read the TSV at `path` ("csv" | "none") and why, in words.

    "auto" scans the file (see the module docstring); InputError if it holds both kinds of
    evidence."""
    if check_tsv_quoting(tsv_quoting) != "auto":
        return tsv_quoting, f"--tsv-quoting {tsv_quoting}"
    ev = scan_tsv_quotes(path)
    if ev.literal_fields and (ev.csv_fields or ev.header_quoted):
        line, what = (1, "every field of the header quoted") if ev.header_quoted else (ev.csv_line, ev.csv_what)
        raise InputError(
            f"{path}: cannot tell how this TSV is quoted: the record at line {line} is CSV-quoted "
            f"({what}), as pandas and csv.writer write a TSV, but the record at line {ev.literal_line} "
            f"holds quotes that are text ({ev.literal_what}). Pass --tsv-quoting csv to read quoted fields "
            f"the CSV way, or --tsv-quoting none to keep every quote as text")
    if ev.csv_fields or ev.header_quoted:
        found = ["every field of the header quoted"] if ev.header_quoted else []
        if ev.csv_fields:
            found.append(f"{_fields(ev.csv_fields, 'CSV-quoted')} (first at line {ev.csv_line}: {ev.csv_what})")
        return "csv", f"auto: {', '.join(found)}, no literal quotes"
    if ev.literal_fields:
        return "none", (f"auto: {_fields(ev.literal_fields)} with literal quotes (first at line {ev.literal_line}: "
                        f"{ev.literal_what}), no CSV-quoted field")
    if ev.neutral_fields:
        return "none", (f"auto: no CSV-quoted field and no literal quotes; {_fields(ev.neutral_fields)} wrapped "
                        f"in quotes with nothing that needed quoting (first at line {ev.neutral_line}) keep their "
                        f"quotes (pass --tsv-quoting csv if a writer added them)")
    return "none", "auto: no field holds a quote"


# ----------------------------------------------------------------------------- records
#
# Each format yields (line, record): record is a tuple of raw values in the order of `wanted`
# (qid, doc_id, query|input_ids, doc|token_type_ids[, label]) - the label only when the file has
# that column - or a str: why the record was rejected before its values could be read.

Record = tuple[int, "tuple[Any, ...] | str"]


def read_records(path: Path, fmt: str, wanted: list[str], batch_rows: int,
                 tsv_quoting: str | None = "auto") -> Iterator[Record]:
    """The file's records as (line, values in the order of `wanted` | reject reason).

    `batch_rows` is how many Parquet rows are decoded at a time. `tsv_quoting` is how a TSV is
    read: pass `Layout.tsv_quoting` ("csv" | "none", what `inspect_file` decided); "auto" (or
    None) decides again, by the same scan, so a caller passing nothing to either function reads
    rows as its header was read. A read error past the header (a disk error, a gzip stream cut
    short, bad Parquet data) raises InputError."""
    if fmt == "tsv":
        mode = decide_tsv_quoting(path, tsv_quoting or "auto")[0]
        return _csv_records(path, wanted, tsv=True) if mode == "csv" else _tsv_records(path, wanted)
    if fmt == "csv":
        return _csv_records(path, wanted)
    if fmt == "jsonl":
        return _jsonl_records(path, wanted)
    return _parquet_records(path, wanted, batch_rows)


def _read_error(path: Path, line: int, error: Exception) -> InputError:
    return InputError(f"{path}: cannot read past line {line}: {error}")


def _tsv_records(path: Path, wanted: list[str]) -> Iterator[Record]:
    line = 1
    try:
        with _open_binary(path) as f:
            header = _tsv_header(path, f)
            n = len(header)
            get = itemgetter(*(header.index(c) for c in wanted))
            for raw in f:
                line += 1
                try:
                    # rstrip also drops stray CRs before a CRLF: line-ending debris, never data.
                    text = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    yield line, f"undecodable bytes (utf-8) at byte {e.start}"
                    continue
                if not text or text.isspace():
                    continue
                fields = text.split("\t")
                if len(fields) != n:
                    yield line, f"wrong number of fields: expected {n}, got {len(fields)}"
                else:
                    yield line, get(fields)
    except _READ_ERRORS as e:
        raise _read_error(path, line, e) from e


def _csv_records(path: Path, wanted: list[str], tsv: bool = False) -> Iterator[Record]:
    """Records of a .csv file, or (tsv) of a TSV read with --tsv-quoting csv."""
    kind = "CSV-quoted TSV" if tsv else "CSV"
    start = 1
    try:
        with _open_binary(path) as f:
            lines = _DecodedLines(f)
            reader = _csv_reader(lines, tsv)
            header = _csv_header(path, lines, reader, kind)
            n = len(header)
            get = itemgetter(*(header.index(c) for c in wanted))
            while True:
                start = lines.number + 1
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:  # the reader resumes at the next line
                    yield start, f"malformed {kind}: {_csv_error(e)}"
                    continue
                if lines.last_bad >= start:
                    yield start, "undecodable bytes (utf-8)"
                elif not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # blank line
                elif len(fields) != n:
                    yield start, f"wrong number of fields: expected {n}, got {len(fields)}"
                else:
                    yield start, get(fields)
    except _READ_ERRORS as e:
        raise _read_error(path, start, e) from e


def _json_object(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError(f"undecodable bytes (utf-8) at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise RowError(f"malformed JSON: {e}") from None
    except RecursionError:
        raise RowError("malformed JSON: nested too deeply") from None
    if type(obj) is not dict:
        raise RowError(f"JSON line is not an object (got {_JSON_KINDS.get(type(obj), 'a value')})")
    return obj


def _jsonl_records(path: Path, wanted: list[str]) -> Iterator[Record]:
    line = 0
    try:
        with _open_binary(path) as f:
            for line, raw in enumerate(f, 1):
                if raw.isspace():
                    continue
                try:
                    obj = _json_object(raw)
                except RowError as e:
                    yield line, e.reason
                    continue
                values = tuple(obj.get(c) for c in wanted)
                # A \ud800-style escape decodes to a lone surrogate, which no UTF-8 output can hold.
                if b"\\u" in raw and any(type(v) is str and _SURROGATE.search(v) for v in values):
                    yield line, "invalid \\u escape in JSON (lone surrogate)"
                else:
                    yield line, values
    except _READ_ERRORS as e:
        raise _read_error(path, line, e) from e


def _column_values(column: Any) -> tuple[list, set[int]]:
    """Python values of one Arrow column, and the positions whose bytes are not UTF-8.

    Binary columns are decoded here, so one bad value rejects its row rather than the file."""
    import pyarrow as pa

    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return column.to_pylist(), set()
    values, bad = [], set()
    for i, v in enumerate(column.to_pylist()):
        try:
            values.append(None if v is None else v.decode("utf-8"))
        except UnicodeDecodeError:
            values.append(None)
            bad.add(i)
    return values, bad


def _parquet_records(path: Path, wanted: list[str], batch_rows: int) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    line = 0
    try:
        with pq.ParquetFile(path) as pf:
            for batch in pf.iter_batches(batch_size=batch_rows, columns=wanted):
                decoded = [_column_values(batch.column(c)) for c in wanted]
                bad = set().union(*(b for _, b in decoded))
                for i, values in enumerate(zip(*(v for v, _ in decoded))):
                    line += 1
                    yield line, "undecodable bytes (utf-8)" if i in bad else values
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: unreadable Parquet data after row {line}: {e}") from e
