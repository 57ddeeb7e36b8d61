"""Reranking layouts (no paddle): queries + corpus + candidates joined into the pair stream.

`RerankReader` reads what retrieval leaves behind and hands out the same validated chunks of
(qid, query, doc_id, doc[, label]) rows as `DatasetReader`, so the scoring tasks run on it as
they are:

- queries: BEIR `queries.jsonl` (`_id`, `text`) or MS MARCO `queries.tsv` (no header);
- corpus: BEIR `corpus.jsonl` (`_id`, `title`, `text`; title and text joined as BEIR's rerankers
  join them) or MS MARCO `collection.tsv` (no header); see `pipeline.io.corpus`;
- candidates: a TREC run file (`qid Q0 doc_id rank score tag`, whitespace-separated, any name
  whose suffix is not a pair-file format, e.g. `.trec`, `.run`, `.txt`, gzipped or not), or a pair
  file (TSV/CSV/JSONL/Parquet with `qid` and `doc_id` columns, optionally `label`; no texts).

`depth` K keeps the top K candidates of each query: for a run file by score descending, equal
scores in file order (BEIR's `sorted(..., reverse=True)[:top_k]` keeps the same ones); for a
pair file the first K in file order. Candidates beyond the depth are not rows of the run: they
are counted (`beyond_depth`), not rejected.

The candidates file is the run's input file: a row is identified by its (file, line) there.
Every candidate within the depth ends as a row or a reject: a malformed line, a query id not in
the queries file or a doc id not in the corpus is rejected with that reason (and the ids).

Memory: the selection keeps 12 bytes a candidate line (query number and score) while it reads
the candidates once; then the texts of the queries the candidates name; the corpus stays on
disk behind its index (16 bytes a document).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from pipeline.io.corpus import CorpusIndex, LookupStats, load_queries, open_bytes
from pipeline.io.formats import Record, TsvQuoting, detect_format, inspect_file, read_records
from pipeline.io.rows import Chunk, ColumnMap, FileCount, InputError, Reject
from pipeline.io.validate import KnownIdsReject, SeenPairs, Validator

__all__ = ["RerankReader", "RerankSources"]

_TREC_FIELDS = "qid Q0 doc_id rank score tag"


@dataclass(frozen=True)
class RerankSources:
    """The three files of a reranking run and how deep to rerank."""

    queries: Path
    corpus: Path
    candidates: Path
    depth: int | None = None  # top K candidates per query; None: all


def is_trec_run(path: Path) -> bool:
    """A candidates file whose suffix is no pair-file format is read as a TREC run."""
    try:
        detect_format(path)
        return False
    except InputError:
        return True


def _trec_records(path: Path) -> Iterator[tuple[int, tuple[str, str, float] | str]]:
    """(line, (qid, doc_id, score) | reject reason) of a TREC run file."""
    with open_bytes(path) as f:
        for line, raw in enumerate(f, 1):
            if raw.isspace():
                continue
            try:
                fields = raw.decode("utf-8").split()
            except UnicodeDecodeError as e:
                yield line, f"undecodable bytes (utf-8) at byte {e.start}"
                continue
            if len(fields) != 6:
                yield line, f"wrong number of fields for a TREC run line ({_TREC_FIELDS}): expected 6, got {len(fields)}"
                continue
            qid, _, doc_id, rank, score, _ = fields
            try:
                s = float(score)
            except ValueError:
                yield line, f"score {score!r} is not a number"
                continue
            if not math.isfinite(s):
                yield line, f"score {score!r} is not a finite number"
            elif not rank.lstrip("-").isdigit():
                yield line, f"rank {rank!r} is not an integer"
            else:
                yield line, (qid, doc_id, s)


class RerankReader:
    """Candidates joined with their query and document texts (see the module docstring)."""

    pretokenized = False

    def __init__(self, sources: RerankSources, columns: ColumnMap = ColumnMap(), chunk_rows: int = 4096,
                 index_cache: Path | None = None, tsv_quoting: str = "auto"):
        self.sources = sources
        self.columns = columns
        self.chunk_rows = chunk_rows
        self.index_cache = index_cache
        if sources.depth is not None and sources.depth < 1:
            raise InputError(f"--depth must be >= 1, got {sources.depth}")
        cand = Path(sources.candidates)
        self.files = [cand]
        self.trec = is_trec_run(cand)
        if self.trec:
            open_bytes(cand).close()
            self.has_label = False
            self._layout = None
            self.candidates_format = "trec run"
        else:
            self._layout = inspect_file(cand, tsv_quoting)
            missing = [c for c in (columns.qid, columns.doc_id) if c not in self._layout.columns]
            if missing:
                raise InputError(f"{cand}: {self._layout.where}: a candidates pair file needs the columns "
                                 f"{columns.qid!r} and {columns.doc_id!r} (missing {', '.join(map(repr, missing))}); "
                                 f"columns found: {', '.join(map(repr, self._layout.columns))}")
            self.has_label = columns.label in self._layout.columns
            self.candidates_format = f"pair file ({self._layout.fmt})"
        for path in (sources.queries, sources.corpus):
            open_bytes(Path(path)).close()
        self.counts: dict[str, FileCount] = {str(cand): FileCount(str(cand))}
        self.quoting: dict[str, TsvQuoting] = TsvQuoting.of(self.files, [self._layout]) if self._layout else {}
        self._prepared = False

    # -- candidates

    def _candidate_records(self) -> Iterator[tuple[int, tuple | str]]:
        """(line, (qid, doc_id, score, label) | reason); score NaN for pair files, label NaN
        where there is none (run files; pair files without a label column)."""
        cand = self.files[0]
        if self.trec:
            for line, rec in _trec_records(cand):
                yield (line, rec) if type(rec) is str else (line, (rec[0], rec[1], rec[2], None))
            return
        c = self.columns
        wanted = [c.qid, c.doc_id] + ([c.label] if self.has_label else [])
        for line, rec in read_records(cand, self._layout.fmt, wanted, self.chunk_rows, self._layout.tsv_quoting):
            if type(rec) is str:
                yield line, rec
            else:
                yield line, (rec[0], rec[1], math.nan, rec[2] if self.has_label else None)

    @staticmethod
    def _id(value) -> str:
        return value.strip() if type(value) is str else str(value) if type(value) is int else ""

    def _prepare(self) -> None:
        """One pass over the candidates: which lines are within the depth, which queries they
        need; then the queries' texts and the corpus index."""
        if self._prepared:
            return
        codes, scores = array("i"), array("d")
        code_of: dict[str, int] = {}
        self.malformed_lines = 0
        for _, rec in self._candidate_records():
            if type(rec) is str:
                self.malformed_lines += 1
                continue
            q = self._id(rec[0])
            codes.append(code_of.setdefault(q, len(code_of)))
            scores.append(rec[2])
        code = np.frombuffer(codes, dtype=np.int32) if len(codes) else np.zeros(0, np.int32)
        depth = self.sources.depth
        if depth is None:
            keep = np.ones(len(code), dtype=bool)
        else:
            score = np.frombuffer(scores, dtype=np.float64) if len(scores) else np.zeros(0)
            # NaN (pair files) sorts as equal: file order decides.
            key = np.where(np.isnan(score), 0.0, -score)
            order = np.lexsort((np.arange(len(code)), key, code))
            sorted_code = code[order]
            starts = np.searchsorted(sorted_code, sorted_code, side="left")
            within = np.arange(len(order)) - starts < depth
            keep = np.zeros(len(code), dtype=bool)
            keep[order[within]] = True
        self._keep = keep
        self.candidate_lines = len(code)
        self.beyond_depth = int((~keep).sum())
        wanted = set(code_of)  # every query keeps at least its first candidate
        self.queries, self.query_stats = load_queries(Path(self.sources.queries), wanted)
        self.corpus = CorpusIndex.open(Path(self.sources.corpus), self.index_cache)
        self._prepared = True

    # -- rows

    def chunks(self) -> Iterator[tuple[Chunk | None, list[Reject]]]:
        """As `DatasetReader.chunks`: (chunk, rejects) per batch of chunk_rows candidates within
        the depth, in file order; every call starts afresh."""
        self._prepare()
        name = str(self.files[0])
        self.counts[name] = FileCount(name)
        validator = Validator([name], 0, 0, SeenPairs(), self.columns, False, self.has_label, self.has_label,
                              self.counts[name])
        records = self._joined(self._within_depth())
        try:
            while batch := list(islice(records, self.chunk_rows)):
                yield validator.process(batch)
        finally:
            self.corpus.close()

    def _within_depth(self) -> Iterator[tuple[int, tuple | str]]:
        keep, i = self._keep, 0
        for line, rec in self._candidate_records():
            if type(rec) is str:
                yield line, rec
                continue
            if keep[i]:
                yield line, rec
            i += 1

    def _joined(self, records: Iterator[tuple[int, tuple | str]]) -> Iterator[Record]:
        """Candidate records with their texts looked up, a batch at a time."""
        while batch := list(islice(records, self.chunk_rows)):
            ok = [k for k, (_, rec) in enumerate(batch) if type(rec) is not str]
            doc_ids = [self._id(batch[k][1][1]) for k in ok]
            texts, problems = self.corpus.texts(doc_ids)
            doc_text = dict(zip(ok, texts))
            doc_problem = {ok[j]: why for j, why in problems.items()}
            for k, (line, rec) in enumerate(batch):
                if type(rec) is str:
                    yield line, rec
                    continue
                qid_raw, doc_raw, _, label = rec
                q, d = self._id(qid_raw), self._id(doc_raw)
                query, doc = self.queries.get(q), doc_text[k]
                if q and d and query is None:
                    yield line, KnownIdsReject(f"query id {q!r} is not in {self.sources.queries}"
                                               + _unreadable_note(self.query_stats), q, d)
                elif q and d and doc is None:
                    why = (f"doc id {d!r}: its line in {self.sources.corpus} cannot be read ({doc_problem[k]})"
                           if k in doc_problem else f"doc id {d!r} is not in {self.sources.corpus}"
                           + _unreadable_note(self.corpus.stats))
                    yield line, KnownIdsReject(why, q, d)
                else:  # ids and texts checked by the Validator (empty id, empty text, ...)
                    values = (qid_raw, doc_raw, query, doc)
                    yield line, (values + (label,) if self.has_label else values)

    # -- report

    def layout_report(self) -> dict:
        """What report.json says about the joined files."""
        self._prepare()
        return {
            "layout": "rerank",
            "candidates": {"file": str(self.files[0]), "format": self.candidates_format,
                           "lines": self.candidate_lines + self.malformed_lines,
                           "malformed_lines": self.malformed_lines, "depth": self.sources.depth,
                           "beyond_depth": self.beyond_depth},
            "queries": {**self.query_stats.to_dict(), "used": len(self.queries)},
            "corpus": self.corpus.stats.to_dict(),
        }


def _unreadable_note(stats: LookupStats) -> str:
    if not stats.unreadable_lines:
        return ""
    return f" (which has {stats.unreadable_lines} unreadable lines, first {stats.first_unreadable})"
