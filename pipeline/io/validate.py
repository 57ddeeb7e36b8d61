"""Record validation (no paddle): raw values -> accepted rows and rejects, duplicates found.

A record is rejected, with a reason naming the field, when an id is missing, empty, not a
string or integer, or holds a tab or a line break (no TSV output could hold it), a text is
missing or blank, token ids are not a list of non-negative int64s (or the two lists differ in
length), the label is not a finite number, any of them holds a NUL, or its (qid, doc_id) pair
was accepted before. The first accepted occurrence of a pair wins.

An empty or missing label (an empty cell, JSON null or an absent key, a Parquet null) is not
an error: the pair is unjudged, the usual case in a reranking run. It is scored and ranked with
label NaN, and the metrics treat it as trec_eval treats a document missing from the qrels.

Duplicates are found by `pair_key`, a stable 64-bit hash of the pair: the same value in every
process, run and machine, so shards read in different processes can compare their pairs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from hashlib import blake2b
from typing import Any, NamedTuple

import numpy as np

from pipeline.io.formats import Record
from pipeline.io.rows import Chunk, ColumnMap, FileCount, Reject, RowError

_INT64_MAX = 2**63 - 1

# ----------------------------------------------------------------------------- values


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
        raise RowError(f"missing field '{name}'")
    else:
        raise RowError(f"field '{name}' must be a string or an integer, got {_show(value)}")
    if not s:
        raise RowError(f"empty id in field '{name}'")
    if "\x00" in s:
        raise RowError(f"NUL byte in field '{name}'")
    if "\t" in s or "\n" in s or "\r" in s:
        raise RowError(f"field '{name}' holds a tab or a line break, which the TSV outputs cannot hold")
    return s


def _text(value: Any, name: str) -> str:
    if type(value) is not str:
        if value is None:
            raise RowError(f"missing field '{name}'")
        raise RowError(f"field '{name}' must be text, got {_show(value)}")
    if not value or value.isspace():
        raise RowError(f"empty text in field '{name}'")
    if "\x00" in value:
        raise RowError(f"NUL byte in field '{name}'")
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
        raise RowError(f"missing field '{name}'")
    if type(ids) is not list or not all(type(t) is int and 0 <= t <= _INT64_MAX for t in ids):
        raise RowError(f"field '{name}' is not a list of non-negative integers: {_show(value)}")
    return ids


def _token_pair(input_ids: Any, token_type_ids: Any, c: ColumnMap) -> tuple[list[int], list[int]]:
    """A pre-tokenized record's two id lists: non-empty and of one length."""
    ids = _token_ids(input_ids, c.input_ids)
    types = _token_ids(token_type_ids, c.token_type_ids)
    if not ids:
        raise RowError(f"empty {c.input_ids}")
    if len(types) != len(ids):
        raise RowError(f"{c.token_type_ids} has {len(types)} ids but {c.input_ids} has {len(ids)}")
    return ids, types


def _label(value: Any, name: str) -> float:
    """A finite number, or NaN for an unjudged pair (empty cell, JSON null or absent key, Parquet null)."""
    if value is None or (type(value) is str and not value.strip()):
        return math.nan
    if type(value) is bool:  # float(True) would pass silently
        raise RowError(f"{name} {_show(value)} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise RowError(f"{name} {_show(value)} is not a number") from None
    if not math.isfinite(x):
        raise RowError(f"{name} {_show(value)} is not a finite number")
    return x


# ----------------------------------------------------------------------------- duplicates


def pair_key(qid: str, doc_id: str) -> int:
    """The stable signed 64-bit key of a (qid, doc_id) pair, equal in every process and run.

    It is BLAKE2b with an 8-byte digest (`hashlib.blake2b(data, digest_size=8)`) of the UTF-8
    bytes of qid + NUL + doc_id, read as a little-endian signed integer. An accepted id holds no
    NUL, so the joined string names one pair. Equal to `pair_keys([qid], [doc_id])[0]`."""
    data = f"{qid}\x00{doc_id}".encode("utf-8", "surrogatepass")
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little", signed=True)


def pair_keys(qids: Sequence[str], doc_ids: Sequence[str]) -> np.ndarray:
    """`pair_key` of each pair, as int64 (one join of the digests, not one Python int a pair)."""
    digests = b"".join([blake2b(f"{q}\x00{d}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
                        for q, d in zip(qids, doc_ids)])
    return np.frombuffer(digests, dtype="<i8").astype(np.int64, copy=False)


class SeenPairs:
    """First occurrence of every (qid, doc_id) pair in 16 bytes a pair.

    A dict of the pairs themselves costs over 100 bytes a pair, which would make a run's memory
    grow with its input. Here a pair is its 64-bit `pair_key` (stable across processes and runs)
    with its location: recent pairs in a small dict, older ones in sorted numpy runs of
    RECENT_LIMIT pairs that are never merged (a merge would briefly need several times the
    memory). Two different pairs share a key with probability about n^2 / 2^65 (3e-6 for ten
    million pairs); the reject reason then still names the first location, so such a case can be
    checked.
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


# ----------------------------------------------------------------------------- batches


class KnownIdsReject(NamedTuple):
    """A record rejected by its producer after its ids were read (e.g. a reranking candidate
    whose document is not in the corpus): the reject keeps the ids. A record is either a tuple
    of raw values, a reason (str), or one of these."""

    reason: str
    qid: str
    doc_id: str


# The accepted rows of a batch, column by column: rows, lines, qids, doc_ids, firsts (query texts
# or input_ids), seconds (doc texts or token_type_ids), labels.
_Columns = tuple[list[int], list[int], list[str], list[str], list, list, list[float]]


class Validator:
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
        """The batch's accepted rows (None if there are none) and its rejects, in row order."""
        columns, rejects = self._check(records)
        if columns[0]:
            columns = self._drop_duplicates(columns, rejects)
        self.count.rows_read += len(records)
        self.count.rows_rejected += len(rejects)
        return (self._chunk(columns) if columns[0] else None), rejects

    def _check(self, records: list[Record]) -> tuple[_Columns, list[Reject]]:
        """Each record's values checked and normalised; duplicates are not looked for yet."""
        # One loop over the batch with locals, not a method call per record: this is the hot path.
        c, file, pretokenized, labelled = self.columns, self.file, self.pretokenized, self.labelled
        columns: _Columns = ([], [], [], [], [], [], [])
        rows, lines, qids, doc_ids, firsts, seconds, labels = columns
        rejects: list[Reject] = []
        row = self.next_row - 1
        for line, record in records:
            row += 1
            if type(record) is not tuple:  # rejected before its values could be checked
                if type(record) is str:
                    rejects.append(Reject(file, line, row, record))
                else:
                    rejects.append(Reject(file, line, row, record.reason, record.qid, record.doc_id))
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
                    first, second = _token_pair(first, second, c)
                else:
                    first = _text(first, c.query)
                    second = _text(second, c.doc)
                y = _label(label, c.label) if labelled else math.nan
            except RowError as e:
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
        return columns, rejects

    def _drop_duplicates(self, columns: _Columns, rejects: list[Reject]) -> _Columns:
        """The rows whose pair was not accepted before; the others go to `rejects` (kept in row
        order)."""
        rows, lines, qids, doc_ids = columns[:4]
        n_files, index = len(self.files), self.index
        first = self.seen.first_seen(pair_keys(qids, doc_ids), np.array(lines, dtype=np.int64) * n_files + index)
        dup = np.flatnonzero(first >= 0)
        if not len(dup):
            return columns
        for i in dup.tolist():
            seen_line, seen_file = divmod(int(first[i]), n_files)
            rejects.append(Reject(self.file, lines[i], rows[i],
                                  f"duplicate (qid, doc_id) = ({qids[i]!r}, {doc_ids[i]!r}), "
                                  f"first seen at {self.files[seen_file]}:{seen_line}", qids[i], doc_ids[i]))
        rejects.sort(key=lambda r: r.row)
        keep = (first < 0).tolist()
        return tuple([x for x, k in zip(col, keep) if k] for col in columns)  # type: ignore[return-value]

    def _chunk(self, columns: _Columns) -> Chunk:
        rows, lines, qids, doc_ids, firsts, seconds, labels = columns
        pretokenized = self.pretokenized
        return Chunk(
            file=self.file,
            row=np.array(rows, dtype=np.int64),
            line=np.array(lines, dtype=np.int64),
            qid=qids,
            doc_id=doc_ids,
            query=None if pretokenized else firsts,
            doc=None if pretokenized else seconds,
            label=np.array(labels, dtype=np.float64) if self.has_label else None,
            input_ids=firsts if pretokenized else None,
            token_type_ids=seconds if pretokenized else None,
        )
