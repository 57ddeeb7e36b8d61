"""Query and document lookup files of the reranking layouts (no paddle): what a candidate's ids
point at.

Two layouts each, chosen by suffix:
- BEIR: `queries.jsonl` objects with `_id` and `text`; `corpus.jsonl` objects with `_id`,
  `title` and `text`. A document's text is `(title + " " + text).strip()`, as BEIR's own
  rerankers join them (beir/reranking/rerank.py). Queries may be gzipped; the corpus may not.
- MS MARCO: `queries.tsv` and `collection.tsv`, `id <TAB> text` without a header, quotes
  literal; the text is everything after the first tab (line ending removed, nothing else).

The queries a run needs (those its candidates name) are held in memory; the corpus is not. A
`CorpusIndex` holds 16 bytes a document (a stable 64-bit key of the id, sorted, and the byte
offset of its line) and reads a chunk's documents from the file with seeks, so a corpus of
millions of documents costs tens of MB whatever its text size. The index of a corpus is kept in
a cache folder (keyed by the file's path, size and mtime) and rebuilt when missing.

Lines that cannot be read (bad JSON, no `_id`, no tab, not UTF-8) are counted with the first
such line, not fatal: a candidate that needs one is rejected with a reason that says so. An id
that appears twice keeps its first line; the duplicates are counted (`LookupStats`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from hashlib import blake2b
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.io.rows import InputError

__all__ = ["CorpusIndex", "LookupStats", "load_queries", "lookup_layout", "open_bytes"]

_BEIR = (".jsonl", ".ndjson")
_MSMARCO = (".tsv",)
INDEX_FORMAT = "corpus-index-1"
_KEY_BATCH = 1 << 16
# `{"_id": "..."` at the very start of a line: the first key of the object, so it cannot sit
# inside a string value; anything else goes through json.loads.
_LEADING_ID = re.compile(rb'\s*\{\s*"_id"\s*:\s*"([^"\\]*)"')


@dataclass
class LookupStats:
    """What a lookup file held, for report.json."""

    file: str
    layout: str  # 'beir' | 'msmarco'
    entries: int = 0  # lines with a readable id
    unreadable_lines: int = 0
    first_unreadable: str = ""  # "line N: reason"
    duplicate_ids: int = 0  # later lines whose id an earlier line has (the first one is used)
    first_duplicate: str = ""

    def unreadable(self, line: int, reason: str) -> None:
        self.unreadable_lines += 1
        if not self.first_unreadable:
            self.first_unreadable = f"line {line}: {reason}"

    def to_dict(self) -> dict:
        return asdict(self)


def _name(path: Path) -> str:
    n = path.name.lower()
    return n[:-3] if n.endswith(".gz") else n


def lookup_layout(path: Path, what: str) -> str:
    """'beir' (.jsonl) or 'msmarco' (.tsv) from the file name, or InputError."""
    suffix = Path(_name(path)).suffix
    if suffix in _BEIR:
        return "beir"
    if suffix in _MSMARCO:
        return "msmarco"
    raise InputError(f"{path}: {what} must be BEIR JSON Lines (.jsonl) or an MS MARCO TSV (.tsv, id<TAB>text, "
                     f"no header)")


def open_bytes(path: Path) -> BinaryIO:
    """A lookup or candidates file's bytes (gunzipped for .gz), or InputError if it is missing or empty."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _key(ids: Iterable[bytes]) -> np.ndarray:
    """Stable signed 64-bit keys of UTF-8 ids (BLAKE2b, 8 bytes), equal in every process."""
    digests = b"".join([blake2b(i, digest_size=8).digest() for i in ids])
    return np.frombuffer(digests, dtype="<i8").astype(np.int64, copy=False)


def _beir_entry(raw: bytes, text_fields: tuple[str, ...]) -> tuple[str, str]:
    """(id, text) of a BEIR line, or ValueError with the reason."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"malformed JSON: {e}") from None
    if type(obj) is not dict:
        raise ValueError("not a JSON object")
    doc_id = obj.get("_id")
    if type(doc_id) is int:
        doc_id = str(doc_id)
    if type(doc_id) is not str or not doc_id.strip():
        raise ValueError("no string '_id'")
    parts = []
    for f in text_fields:
        v = obj.get(f)
        if v is None:
            continue
        if type(v) is not str:
            raise ValueError(f"field '{f}' is not text")
        parts.append(v)
    return doc_id.strip(), " ".join(parts).strip()


def _msmarco_entry(raw: bytes) -> tuple[str, str]:
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"undecodable bytes (utf-8) at byte {e.start}") from None
    doc_id, tab, text = line.partition("\t")
    if not tab:
        raise ValueError("no tab (expected id<TAB>text)")
    if not doc_id.strip():
        raise ValueError("empty id")
    return doc_id.strip(), text


# ----------------------------------------------------------------------------- queries


def load_queries(path: Path, wanted: set[str]) -> tuple[dict[str, str], LookupStats]:
    """The texts of the `wanted` query ids found in `path` (others are read and dropped)."""
    layout = lookup_layout(path, "the queries file")
    stats = LookupStats(str(path), layout)
    out: dict[str, str] = {}
    with open_bytes(path) as f:
        for line, raw in enumerate(f, 1):
            if raw.isspace():
                continue
            try:
                qid, text = _beir_entry(raw, ("text",)) if layout == "beir" else _msmarco_entry(raw)
            except ValueError as e:
                stats.unreadable(line, str(e))
                continue
            stats.entries += 1
            if qid not in wanted:
                continue
            if qid in out:  # counted for the ids the run uses: the first line wins
                stats.duplicate_ids += 1
                stats.first_duplicate = stats.first_duplicate or f"line {line}: id {qid!r}"
            else:
                out[qid] = text
    return out, stats


# ----------------------------------------------------------------------------- corpus


class CorpusIndex:
    """Documents of a corpus file by id, read from disk on demand (see the module docstring)."""

    def __init__(self, path: Path, keys: np.ndarray, offsets: np.ndarray, stats: LookupStats):
        self.path = path
        self.layout = stats.layout
        self.keys = keys  # int64, sorted
        self.offsets = offsets  # int64, byte offset of each key's line; file order among equal keys
        self.stats = stats
        self._file: BinaryIO | None = None

    # -- building

    @classmethod
    def open(cls, path: Path, cache: Path | None = None) -> CorpusIndex:
        """The index of `path`, from `cache` when it holds one for this very file."""
        path = Path(path)
        layout = lookup_layout(path, "the corpus")
        if path.name.lower().endswith(".gz"):
            raise InputError(f"{path}: the corpus is read with seeks, which a gzip file does not allow: "
                             f"decompress it first (gunzip -k {path})")
        open_bytes(path).close()  # exists and is not empty
        cached = cls._cache_file(path, cache)
        if cached is not None and cached.exists():
            try:
                with np.load(cached, allow_pickle=False) as z:
                    meta = json.loads(str(z["meta"]))
                    if meta.get("format") == INDEX_FORMAT:
                        return cls(path, z["keys"], z["offsets"], LookupStats(**meta["stats"]))
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable cache entry: rebuild it
        index = cls._build(path, layout)
        if cached is not None:
            index._save(cached)
        return index

    @staticmethod
    def _cache_file(path: Path, cache: Path | None) -> Path | None:
        if cache is None:
            return None
        st = path.stat()
        ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()
        return Path(cache) / f"{hashlib.sha256(ident).hexdigest()[:24]}.npz"

    def _save(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        meta = json.dumps({"format": INDEX_FORMAT, "file": str(self.path), "stats": self.stats.to_dict()})
        with open(tmp, "wb") as f:
            np.savez(f, keys=self.keys, offsets=self.offsets, meta=np.array(meta))
        os.replace(tmp, target)

    @classmethod
    def _build(cls, path: Path, layout: str) -> CorpusIndex:
        stats = LookupStats(str(path), layout)
        key_parts, offset_parts = [], []
        ids: list[bytes] = []
        offsets: list[int] = []

        def flush() -> None:
            if ids:
                key_parts.append(_key(ids))
                offset_parts.append(np.array(offsets, dtype=np.int64))
                ids.clear()
                offsets.clear()

        for line, offset, doc_id in cls._scan(path, layout, stats):
            ids.append(doc_id)
            offsets.append(offset)
            if len(ids) >= _KEY_BATCH:
                flush()
        flush()
        keys = np.concatenate(key_parts) if key_parts else np.zeros(0, np.int64)
        offs = np.concatenate(offset_parts) if offset_parts else np.zeros(0, np.int64)
        stats.entries = len(keys)
        order = np.lexsort((offs, keys))  # by key, file order among equal keys
        index = cls(path, keys[order], offs[order], stats)
        index._count_duplicates()
        return index

    @staticmethod
    def _scan(path: Path, layout: str, stats: LookupStats) -> Iterator[tuple[int, int, bytes]]:
        """(line, byte offset, UTF-8 id) of every readable line."""
        offset = 0
        with open(path, "rb") as f:
            for line, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                if raw.isspace():
                    continue
                if layout == "msmarco":
                    tab = raw.find(b"\t")
                    doc_id = raw[:tab].strip() if tab >= 0 else b""
                    if tab < 0 or not doc_id:
                        stats.unreadable(line, "no tab (expected id<TAB>text)" if tab < 0 else "empty id")
                        continue
                    try:
                        doc_id.decode("utf-8")
                    except UnicodeDecodeError:
                        stats.unreadable(line, "id is not UTF-8")
                        continue
                else:
                    m = _LEADING_ID.match(raw)
                    if m and m.group(1).strip():
                        doc_id = m.group(1).strip()
                    else:
                        try:
                            doc_id = _beir_entry(raw, ())[0].encode("utf-8", "surrogatepass")
                        except ValueError as e:
                            stats.unreadable(line, str(e))
                            continue
                yield line, start, doc_id

    def _count_duplicates(self) -> None:
        """Equal keys are duplicate ids (or, astronomically rarely, two ids with one key, which
        `texts` tells apart by reading the lines)."""
        same = np.flatnonzero(self.keys[1:] == self.keys[:-1]) + 1
        for i in same.tolist():
            first_id = self._read(int(self.offsets[i - 1]))[0]
            this_id = self._read(int(self.offsets[i]))[0]
            if first_id is not None and first_id == this_id:
                self.stats.duplicate_ids += 1
                if not self.stats.first_duplicate:
                    self.stats.first_duplicate = f"line {self._line_at(int(self.offsets[i]))}: id {this_id!r}"
        self.close()

    def _line_at(self, offset: int) -> int:
        """1-based number of the line starting at byte `offset` (reads the file up to it)."""
        newlines, done = 0, 0
        with open(self.path, "rb") as f:
            while done < offset:
                block = f.read(min(1 << 20, offset - done))
                if not block:
                    break
                newlines += block.count(b"\n")
                done += len(block)
        return newlines + 1

    # -- reading

    def _read(self, offset: int) -> tuple[str | None, str]:
        """(id, text) of the line at `offset`, or (None, reason)."""
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(offset)
        raw = self._file.readline()
        try:
            return _beir_entry(raw, ("title", "text")) if self.layout == "beir" else _msmarco_entry(raw)
        except ValueError as e:
            return None, str(e)

    def texts(self, ids: list[str]) -> tuple[list[str | None], dict[int, str]]:
        """Each id's document text (None where there is none), and for the ids whose line was
        found but could not be read, why."""
        out: list[str | None] = [None] * len(ids)
        problems: dict[int, str] = {}
        if not ids or not len(self.keys):
            return out, problems
        keys = _key([i.encode("utf-8", "surrogatepass") for i in ids])
        lo = np.searchsorted(self.keys, keys, side="left")
        hi = np.searchsorted(self.keys, keys, side="right")
        found = np.flatnonzero(hi > lo)
        # Read in file order: one forward pass over the chunk's documents.
        for i in found[np.argsort(self.offsets[lo[found]], kind="stable")].tolist():
            for j in range(int(lo[i]), int(hi[i])):
                doc_id, text = self._read(int(self.offsets[j]))
                if doc_id == ids[i]:
                    out[i] = text
                    break
                if doc_id is None and j == int(lo[i]):
                    problems[i] = text
        return out, problems

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return len(self.keys)
