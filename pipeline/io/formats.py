"""Input files at the byte level (no paddle): suffixes, file listing, headers, raw records.

Formats, chosen by suffix: `.tsv` (tab-separated, no quoting: quotes are literal), `.csv`
(standard quoting, a record may span lines), `.jsonl`/`.ndjson` (one object per line) and
`.parquet`; the three text formats may also be gzipped (`.tsv.gz` ...). A JSONL file's first
object plays the role of a header: its keys say which columns the file has. Blank lines are
skipped in every text format; they count as lines, not as rows.

`inspect_file` finds a file's columns before any row is read (or raises InputError);
`read_records` streams its records as raw values for `pipeline.io.validate` to check.
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


def _csv_header(path: Path, lines: _DecodedLines, reader: Iterator[list[str]]) -> list[str]:
    try:
        names = next(reader)
    except StopIteration:
        raise InputError(f"{path}: empty file (no content)") from None
    except csv.Error as e:
        raise InputError(f"{path}: line 1 (header) is not valid CSV: {e}") from e
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


def inspect_file(path: Path) -> Layout:
    """Column names of a file, or InputError if the file cannot supply any row."""
    fmt = detect_format(path)
    try:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: empty file (0 bytes)")
        if fmt == "parquet":
            return _inspect_parquet(path)
        with _open_binary(path) as f:
            if fmt == "jsonl":
                return _inspect_jsonl(path, f)
            if fmt == "tsv":
                columns = _tsv_header(path, f)
            else:
                lines = _DecodedLines(f)
                columns = _csv_header(path, lines, csv.reader(lines))
            if not any(raw.strip() for raw in f):
                raise InputError(f"{path}: no data rows (the file holds a header line and nothing else)")
            return Layout(fmt, columns, "line 1 (header)")
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


# ----------------------------------------------------------------------------- records
#
# Each format yields (line, record): record is a tuple of raw values in the order of `wanted`
# (qid, doc_id, query|input_ids, doc|token_type_ids[, label]) - the label only when the file has
# that column - or a str: why the record was rejected before its values could be read.

Record = tuple[int, "tuple[Any, ...] | str"]


def read_records(path: Path, fmt: str, wanted: list[str], batch_rows: int) -> Iterator[Record]:
    """The file's records as (line, values in the order of `wanted` | reject reason).

    `batch_rows` is how many Parquet rows are decoded at a time. A read error past the header
    (a disk error, a gzip stream cut short, bad Parquet data) raises InputError."""
    if fmt == "tsv":
        return _tsv_records(path, wanted)
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


def _csv_records(path: Path, wanted: list[str]) -> Iterator[Record]:
    start = 1
    try:
        with _open_binary(path) as f:
            lines = _DecodedLines(f)
            reader = csv.reader(lines)
            header = _csv_header(path, lines, reader)
            n = len(header)
            get = itemgetter(*(header.index(c) for c in wanted))
            while True:
                start = lines.number + 1
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:  # the reader resumes at the next line
                    yield start, f"malformed CSV: {e}"
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
