"""Streaming dataset reader (no paddle): input files -> validated chunks of query-doc rows.

Every record ends up either in a `Chunk` (accepted) or as a `Reject` naming its file, line and
reason, so a few bad rows in a large dataset cost those rows and not the run. Problems that make
a whole file unusable (missing, empty, required column absent, not the format its name says)
raise `InputError`; the headers of *all* files are checked when the reader is built, so such a
problem stops the run before any work rather than hours into it.

Formats, chosen by suffix: `.tsv` (tab-separated, no quoting: quotes are literal), `.csv`
(standard quoting, a record may span lines), `.jsonl`/`.ndjson` (one object per line) and
`.parquet`; the three text formats may also be gzipped (`.tsv.gz` ...). Files are streamed, so
memory holds one chunk plus the (qid, doc_id) index used to find duplicates.

Rows are either text pairs (`qid, query, doc_id, doc`) or pre-tokenized pairs
(`qid, doc_id, input_ids, token_type_ids`), both with an optional graded `label`. A JSONL
file's first object plays the role of a header: its keys say which columns the file has.
Blank lines are skipped in every text format; they count as lines, not as rows.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# A single 1 MB document must not abort a CSV file (the csv default limit is 128 KiB).
csv.field_size_limit(2**31 - 1)

_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_GZIP_FORMATS = ("tsv", "csv", "jsonl")
_SUPPORTED = ".tsv .csv .jsonl .ndjson .parquet, and .tsv.gz .csv.gz .jsonl.gz .ndjson.gz"
_BOM = b"\xef\xbb\xbf"
_INT64_MAX = 2**63 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")
_READ_ERRORS = (OSError, EOFError, zlib.error)  # e.g. a disk error, a gzip file cut short
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


class InputError(Exception):
    """File-level problem; message names file, line (when known) and field. Caller exits non-zero."""


@dataclass(frozen=True)
class ColumnMap:
    """The column (or JSON key) that holds each field, as set by the `--col-*` flags."""

    qid: str = "qid"
    query: str = "query"
    doc_id: str = "doc_id"
    doc: str = "doc"
    label: str = "label"
    input_ids: str = "input_ids"
    token_type_ids: str = "token_type_ids"


@dataclass
class Reject:
    """A record left out of the run, with enough to find and fix it in the input."""

    file: str  # path as given by the caller
    line: int  # 1-based physical line where the record starts (Parquet: 1-based row number)
    row: int  # global 0-based input row index, counting accepted and rejected records of all files
    reason: str
    qid: str = ""
    doc_id: str = ""


@dataclass
class Chunk:
    """Accepted rows of one file, in input order."""

    file: str
    row: np.ndarray  # int64, global 0-based input row index
    line: np.ndarray  # int64, as in Reject
    qid: list[str]
    doc_id: list[str]
    query: list[str] | None  # None for pre-tokenized input
    doc: list[str] | None
    label: np.ndarray | None  # float64, NaN for files without a label column; None if no file has one
    input_ids: list[list[int]] | None  # only for pre-tokenized input
    token_type_ids: list[list[int]] | None

    def __len__(self) -> int:
        return len(self.qid)


@dataclass
class FileCount:
    """Per-file tally for the report; filled as the file is read."""

    file: str
    rows_read: int = 0
    rows_rejected: int = 0  # rows accepted = rows_read - rows_rejected


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
class _Layout:
    """What a file offers, found before any row is read."""

    fmt: str
    columns: list[str]  # column names (JSONL: keys of the first object)
    where: str  # where the names come from, for messages


def _inspect(path: Path) -> _Layout:
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
            return _Layout(fmt, columns, "line 1 (header)")
    except gzip.BadGzipFile as e:
        raise InputError(f"{path}: not a gzip file, although its name ends in .gz ({e})") from e
    except _READ_ERRORS as e:
        raise InputError(f"{path}: cannot read: {e}") from e


def _inspect_jsonl(path: Path, f: BinaryIO) -> _Layout:
    """The first line holding a JSON object defines the file's keys. Lines before it are
    rejected later as rows; a file with no object at all is not JSON Lines."""
    first_problem: tuple[int, str] | None = None
    for number, raw in enumerate(f, 1):
        if raw.isspace():
            continue
        try:
            obj = _json_object(raw)
        except _RowError as e:
            first_problem = first_problem or (number, e.reason)
            continue
        return _Layout("jsonl", list(obj), f"line {number} (first JSON object)")
    if first_problem is None:
        raise InputError(f"{path}: empty file (no JSON lines)")
    number, reason = first_problem
    raise InputError(f"{path}: no line holds a JSON object, so this is not JSON Lines (line {number}: {reason})")


def _inspect_parquet(path: Path) -> _Layout:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as pf:
            columns, rows = pf.schema_arrow.names, pf.metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file: {e}") from e
    if rows == 0:
        raise InputError(f"{path}: no data rows (the Parquet file holds 0 rows)")
    return _Layout("parquet", columns, "Parquet schema")


# ----------------------------------------------------------------------------- records
#
# Each format yields (line, record): record is a tuple of raw values in the order
# (qid, doc_id, query|input_ids, doc|token_type_ids[, label]) - the label only when the file has
# that column - or a str: why the record was rejected before its values could be read.

Record = tuple[int, "tuple[Any, ...] | str"]


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
        raise _RowError(f"undecodable bytes (utf-8) at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise _RowError(f"malformed JSON: {e}") from None
    except RecursionError:
        raise _RowError("malformed JSON: nested too deeply") from None
    if type(obj) is not dict:
        raise _RowError(f"JSON line is not an object (got {_JSON_KINDS.get(type(obj), 'a value')})")
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
                except _RowError as e:
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


# ----------------------------------------------------------------------------- values


class _RowError(Exception):
    """A record that cannot be used; `reason` goes into its Reject."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _show(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def _identifier(value: Any, name: str) -> str:
    """qid/doc_id as written, minus surrounding whitespace; integral numbers as integers."""
    kind = type(value)
    if kind is str:
        s = value.strip()
    elif kind is int:
        s = str(value)
    elif kind is float and value.is_integer():
        s = str(int(value))
    elif value is None:
        raise _RowError(f"missing field '{name}'")
    else:
        raise _RowError(f"field '{name}' must be a string or an integer, got {_show(value)}")
    if not s:
        raise _RowError(f"empty id in field '{name}'")
    if "\x00" in s:
        raise _RowError(f"NUL byte in field '{name}'")
    return s


def _text(value: Any, name: str) -> str:
    if type(value) is not str:
        if value is None:
            raise _RowError(f"missing field '{name}'")
        raise _RowError(f"field '{name}' must be text, got {_show(value)}")
    if not value or value.isspace():
        raise _RowError(f"empty text in field '{name}'")
    if "\x00" in value:
        raise _RowError(f"NUL byte in field '{name}'")
    return value


def _token_ids(value: Any, name: str) -> list[int]:
    """A list of non-negative int64 ids; a text cell holds a JSON list or space-separated ints."""
    ids = value
    if type(value) is str:
        s = value.strip()
        if s.startswith("["):
            try:
                ids = json.loads(s)
            except (ValueError, RecursionError):
                ids = None
        else:
            parts = s.split()
            try:
                ids = [int(p) for p in parts] if all(p.isascii() and p.isdigit() for p in parts) else None
            except ValueError:  # more digits than int() accepts
                ids = None
    elif value is None:
        raise _RowError(f"missing field '{name}'")
    if type(ids) is not list or not all(type(t) is int and 0 <= t <= _INT64_MAX for t in ids):
        raise _RowError(f"field '{name}' is not a list of non-negative integers: {_show(value)}")
    return ids


def _label(value: Any, name: str) -> float:
    if value is None:
        raise _RowError(f"missing field '{name}'")
    if type(value) is bool:  # float(True) would pass silently
        raise _RowError(f"{name} {_show(value)} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        if type(value) is str and not value.strip():
            raise _RowError(f"empty {name}") from None
        raise _RowError(f"{name} {_show(value)} is not a number") from None
    if not math.isfinite(x):
        raise _RowError(f"{name} {_show(value)} is not a finite number")
    return x


# ----------------------------------------------------------------------------- chunks


class SeenPairs:
    """First occurrence of every (qid, doc_id) pair in 16 bytes a pair.

    A dict of the pairs themselves costs over 100 bytes a pair, which would make a run's memory
    grow with its input. Here a pair is its 64-bit hash (`hash` of "qid NUL doc_id"; a run reads
    in one process, so the per-process hash seed is fixed for the whole run) with its location:
    recent pairs in a small dict, older ones in sorted numpy runs of RECENT_LIMIT pairs that are
    never merged (a merge would briefly need several times the memory). Two different pairs
    share a hash with probability about n^2 / 2^65 (3e-6 for ten million pairs); the reject
    reason then still names the first location, so such a case can be checked.
    """

    RECENT_LIMIT = 1 << 16

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys, where), disjoint
        self._recent: dict[int, int] = {}

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self._runs) + len(self._recent)

    def first_seen(self, keys: np.ndarray, where: np.ndarray) -> np.ndarray:
        """For each key in order: -1 if it is new (and remember it at `where`), else where it
        was first seen."""
        out = np.full(len(keys), -1, dtype=np.int64)
        for run_keys, run_where in self._runs:
            idx = np.minimum(np.searchsorted(run_keys, keys), len(run_keys) - 1)
            hit = run_keys[idx] == keys
            out[hit] = run_where[idx[hit]]
        recent = self._recent
        for i in np.flatnonzero(out < 0).tolist():
            w = int(where[i])
            first = recent.setdefault(int(keys[i]), w)
            if first != w:
                out[i] = first
        if len(recent) >= self.RECENT_LIMIT:
            keys_ = np.fromiter(recent.keys(), np.int64, len(recent))
            where_ = np.fromiter(recent.values(), np.int64, len(recent))
            order = np.argsort(keys_)
            self._runs.append((keys_[order], where_[order]))
            self._recent = {}
        return out


class _Validator:
    """Turns one file's records, a batch at a time, into chunks of accepted rows and rejects."""

    def __init__(self, files: list[str], index: int, first_row: int, seen: SeenPairs, columns: ColumnMap,
                 pretokenized: bool, labelled: bool, has_label: bool, count: FileCount):
        self.files = files
        self.index = index
        self.file = files[index]
        self.next_row = first_row
        # First accepted occurrence of each pair, as line * len(files) + file index.
        self.seen = seen
        self.columns = columns
        self.pretokenized = pretokenized
        self.labelled = labelled  # this file has a label column
        self.has_label = has_label  # some file has one
        self.count = count

    def process(self, records: list[Record]) -> tuple[Chunk | None, list[Reject]]:
        # One loop over the batch with locals, not a method call per record: this is the hot path.
        c, file, seen, pretokenized, labelled = self.columns, self.file, self.seen, self.pretokenized, self.labelled
        n_files, index = len(self.files), self.index
        rows: list[int] = []
        lines: list[int] = []
        qids: list[str] = []
        doc_ids: list[str] = []
        firsts: list = []  # query texts or input_ids
        seconds: list = []  # doc texts or token_type_ids
        labels: list[float] = []
        rejects: list[Reject] = []
        keys: list[int] = []
        row = self.next_row - 1
        for line, record in records:
            row += 1
            if type(record) is str:
                rejects.append(Reject(file, line, row, record))
                continue
            if labelled:
                qid, doc_id, first, second, label = record
            else:
                qid, doc_id, first, second = record
            q = d = ""
            try:
                q = _identifier(qid, c.qid)
                d = _identifier(doc_id, c.doc_id)
                if pretokenized:
                    first = _token_ids(first, c.input_ids)
                    second = _token_ids(second, c.token_type_ids)
                    if not first:
                        raise _RowError(f"empty {c.input_ids}")
                    if len(second) != len(first):
                        raise _RowError(f"{c.token_type_ids} has {len(second)} ids but {c.input_ids} "
                                        f"has {len(first)}")
                else:
                    first = _text(first, c.query)
                    second = _text(second, c.doc)
                y = _label(label, c.label) if labelled else math.nan
                # (NUL cannot occur in an accepted id, so the joined string is unambiguous.)
                keys.append(hash(f"{q}\x00{d}"))
            except _RowError as e:
                rejects.append(Reject(file, line, row, e.reason, q, d))
                continue
            rows.append(row)
            lines.append(line)
            qids.append(q)
            doc_ids.append(d)
            firsts.append(first)
            seconds.append(second)
            labels.append(y)
        self.next_row = row + 1
        if rows:
            first = seen.first_seen(np.array(keys, dtype=np.int64), np.array(lines, dtype=np.int64) * n_files + index)
            dup = np.flatnonzero(first >= 0)
            if len(dup):
                for i in dup.tolist():
                    seen_line, seen_file = divmod(int(first[i]), n_files)
                    rejects.append(Reject(file, lines[i], rows[i],
                                          f"duplicate (qid, doc_id) = ({qids[i]!r}, {doc_ids[i]!r}), "
                                          f"first seen at {self.files[seen_file]}:{seen_line}", qids[i], doc_ids[i]))
                rejects.sort(key=lambda r: r.row)
                keep = (first < 0).tolist()
                rows, lines, qids, doc_ids, firsts, seconds, labels = (
                    [x for x, k in zip(col, keep) if k] for col in (rows, lines, qids, doc_ids, firsts, seconds, labels))
        self.count.rows_read += len(records)
        self.count.rows_rejected += len(rejects)
        if not rows:
            return None, rejects
        return Chunk(
            file=file,
            row=np.array(rows, dtype=np.int64),
            line=np.array(lines, dtype=np.int64),
            qid=qids,
            doc_id=doc_ids,
            query=None if pretokenized else firsts,
            doc=None if pretokenized else seconds,
            label=np.array(labels, dtype=np.float64) if self.has_label else None,
            input_ids=firsts if pretokenized else None,
            token_type_ids=seconds if pretokenized else None,
        ), rejects


class DatasetReader:
    """Reads the given files in order as chunks of validated rows (see the module docstring)."""

    def __init__(self, paths: Sequence[str | Path], columns: ColumnMap = ColumnMap(), chunk_rows: int = 4096,
                 pretokenized: bool | None = None):
        """pretokenized None = detect from the first file's columns (text columns present -> text;
        input_ids present -> pre-tokenized). All files must agree.

        Every file's header is checked here, so a bad file fails the run before any work."""
        self.files = list_input_files(paths)
        self.columns = columns
        self.chunk_rows = chunk_rows
        self._layouts = [_inspect(p) for p in self.files]
        first = self._layouts[0].columns
        if pretokenized is None:
            has_text = columns.query in first and columns.doc in first
            pretokenized = not has_text and columns.input_ids in first
        self.pretokenized: bool = pretokenized
        for path, layout in zip(self.files, self._layouts):
            self._check_columns(path, layout)
        self.has_label: bool = any(columns.label in layout.columns for layout in self._layouts)
        self.counts: dict[str, FileCount] = {str(p): FileCount(str(p)) for p in self.files}

    def _required(self) -> list[tuple[str, str]]:
        """(field, column) pairs every file must have, in record order."""
        c = self.columns
        if self.pretokenized:
            fields = ("qid", "doc_id", "input_ids", "token_type_ids")
        else:
            fields = ("qid", "doc_id", "query", "doc")
        return [(f, getattr(c, f)) for f in fields]

    def _check_columns(self, path: Path, layout: _Layout) -> None:
        c = self.columns
        missing = [(f, col) for f, col in self._required() if col not in layout.columns]
        if missing:
            kind = "pre-tokenized" if self.pretokenized else "text"
            names = ", ".join(repr(col) for _, col in missing)
            flags = ", ".join(f"--col-{f.replace('_', '-')} NAME" for f, _ in missing)
            found = ", ".join(repr(col) for col in layout.columns)
            msg = (f"{path}: {layout.where}: missing required column{'s' if len(missing) > 1 else ''} {names} "
                   f"for {kind} input; columns found: {found}. If the data is under other names, map them "
                   f"with {flags}")
            if path != self.files[0]:
                msg += f" (the first file, {self.files[0]}, holds {kind} input; all files must be of one kind)"
            elif not self.pretokenized:
                msg += (f" (pre-tokenized input has {c.qid!r}, {c.doc_id!r}, {c.input_ids!r}, "
                        f"{c.token_type_ids!r} instead)")
            raise InputError(msg)
        for _, col in self._required() + [("label", c.label)]:
            if layout.columns.count(col) > 1:
                raise InputError(f"{path}: {layout.where}: column {col!r} appears {layout.columns.count(col)} times")

    def _records(self, path: Path, labelled: bool, fmt: str) -> Iterator[Record]:
        wanted = [col for _, col in self._required()] + ([self.columns.label] if labelled else [])
        if fmt == "tsv":
            return _tsv_records(path, wanted)
        if fmt == "csv":
            return _csv_records(path, wanted)
        if fmt == "jsonl":
            return _jsonl_records(path, wanted)
        return _parquet_records(path, wanted, self.chunk_rows)

    def chunks(self) -> Iterator[tuple[Chunk | None, list[Reject]]]:
        """Yields (chunk, rejects) per batch of chunk_rows records (fewer at the end of a file);
        chunk holds the batch's accepted rows, None when all of them were rejected. A batch never
        spans two files. Each call reads the dataset from the start (row indices, duplicates and
        counts start afresh)."""
        seen = SeenPairs()
        names = [str(p) for p in self.files]
        for name in names:
            self.counts[name] = FileCount(name)
        next_row = 0
        for index, (path, layout) in enumerate(zip(self.files, self._layouts)):
            labelled = self.columns.label in layout.columns
            validator = _Validator(names, index, next_row, seen, self.columns, self.pretokenized, labelled,
                                   self.has_label, self.counts[names[index]])
            records = self._records(path, labelled, layout.fmt)
            while batch := list(islice(records, self.chunk_rows)):
                yield validator.process(batch)
            next_row = validator.next_row
