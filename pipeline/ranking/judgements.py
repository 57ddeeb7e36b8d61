"""Relevance judgements (qrels) held in numpy arrays, for metrics against the full judgements.

A `Judgements` holds, for every judged (qid, doc_id) pair, its relevance (float64), and gives the
metrics (pipeline.ranking.metrics) what they need without a dict of dicts (a dict entry costs over
100 bytes; here a judgement costs its doc_id string plus about 56 bytes of arrays, and a query's id
is stored once when the caller passes the same str object for it, as `read_qrels` does):

* `relevance(qid, doc_id)`: each row's judged relevance, NaN where the pair is not judged;
* `query_index(qids)`: each qid's judged-query number, -1 for a query without judgements;
* `top_judgements(query_index, k)`: the k highest relevances of each given query, for the ideal DCG;
* `relevant_counts(query_index)`: how many relevant (relevance > 0) judgements each query has.

Lookups are exact: pairs and qids are found through sorted 64-bit hashes (one int64 searchsorted
per row, not one dict lookup) and every hit is then compared with the stored strings. If two
stored keys ever hash alike (astronomically rare), that table falls back to an exact dict.

Relevance may be any finite number, negative too (trec_eval allows it, e.g. -2 for spam); the
metrics treat relevance <= 0 as not relevant with gain 0, as trec_eval does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.ranking.order import _as_float_array, _as_str_array, _check_same_length, _group_codes

__all__ = ["DuplicateJudgement", "Judgements"]


class DuplicateJudgement(ValueError):
    """The same (qid, doc_id) pair is judged twice; `first` and `second` are their row indices."""

    def __init__(self, qid: str, doc_id: str, first: int, second: int):
        super().__init__(f"(qid {qid!r}, doc_id {doc_id!r}) is judged twice: rows {first} and {second}")
        self.qid, self.doc_id, self.first, self.second = qid, doc_id, first, second


def _hashes(columns: tuple[np.ndarray, ...]) -> np.ndarray:
    """64-bit hashes of the rows of the string columns (Python's str/tuple hash, salted per process:
    keys never leave the process; `Judgements` pickles its arrays, not its keys)."""
    n = len(columns[0])
    values = columns[0].tolist() if len(columns) == 1 else zip(*(c.tolist() for c in columns))
    return np.fromiter(map(hash, values), dtype=np.int64, count=n)


class _ExactIndex:
    """Row number of string tuples in a fixed table of distinct tuples (the table's columns are
    object or unicode arrays); -1 for a tuple that is not in it."""

    def __init__(self, columns: tuple[np.ndarray, ...]):
        self._columns = columns
        keys = _hashes(columns)
        self._order = np.argsort(keys, kind="stable")
        self._keys = keys[self._order]
        self._exact: dict | None = None
        if len(keys) > 1 and (self._keys[1:] == self._keys[:-1]).any():
            # equal keys: either the same tuple twice or a hash collision; sort that out exactly
            self._exact = {}
            for i, t in enumerate(zip(*(c.tolist() for c in columns))):
                self._exact.setdefault(t, i)

    def duplicate(self) -> tuple[int, int] | None:
        """(first, second) row of the tuple whose second occurrence comes first, or None."""
        if self._exact is None:
            return None
        if len(self._exact) == len(self._columns[0]):
            return None  # only collisions
        for i, t in enumerate(zip(*(c.tolist() for c in self._columns))):
            first = self._exact[t]
            if first != i:
                return first, i
        raise AssertionError("unreachable")

    def find(self, columns: tuple[np.ndarray, ...]) -> np.ndarray:
        n = len(columns[0])
        if self._exact is not None:
            get = self._exact.get
            return np.fromiter((get(t, -1) for t in zip(*(c.tolist() for c in columns))), dtype=np.int64,
                               count=n)
        out = np.full(n, -1, dtype=np.int64)
        if n == 0 or len(self._keys) == 0:
            return out
        keys = _hashes(columns)
        pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        hit = np.flatnonzero(self._keys[pos] == keys)
        found = self._order[pos[hit]]
        same = np.ones(len(hit), dtype=bool)
        for stored, given in zip(self._columns, columns):
            same &= np.asarray(stored[found] == given[hit], dtype=bool)
        out[hit[same]] = found[same]
        return out


@dataclass(frozen=True)
class _Tables:
    qids: np.ndarray  # distinct judged qids, in order of first appearance
    query: np.ndarray  # judged-query number of every judgement
    starts: np.ndarray  # per query: offset of its judgements in `by_query`
    sizes: np.ndarray  # per query: number of judgements
    by_query: np.ndarray  # judgement rows by (query, relevance descending)
    relevant: np.ndarray  # per query: judgements with relevance > 0


class Judgements:
    """Relevance judgements: a relevance (finite float64) for each judged (qid, doc_id) pair.

    Build with `from_arrays` (or `pipeline.io.qrels.read_qrels`). Immutable. Pickles by its
    arrays (the hash keys are rebuilt on load, since Python's str hash is salted per process).
    """

    def __init__(self, qid: np.ndarray, doc_id: np.ndarray, relevance: np.ndarray, layout: str | None = None):
        """Use `from_arrays`; this trusts its arguments to be checked 1-D arrays of one length."""
        self._qid, self._doc_id, self._relevance = qid, doc_id, relevance
        self.layout = layout  # where they came from, for the report: "trec", "beir" or None
        self._pairs = _ExactIndex((qid, doc_id))
        dup = self._pairs.duplicate()
        if dup is not None:
            first, second = dup
            raise DuplicateJudgement(str(qid[first]), str(doc_id[first]), first, second)
        self._tables = self._build_tables()
        self._queries = _ExactIndex((self._tables.qids,))

    @classmethod
    def from_arrays(cls, qid, doc_id, relevance, *, layout: str | None = None) -> Judgements:
        """Judgements from aligned 1-D arrays: qid and doc_id of str, relevance of finite numbers
        (`layout`: the file layout they were read from, e.g. "trec" or "beir", for the report).

        Raises TypeError / ValueError for malformed arrays, a non-finite relevance, or a pair
        judged twice (`DuplicateJudgement`, a ValueError naming the pair and both rows)."""
        qid = _as_str_array("qid", qid).astype(object, copy=False)
        doc_id = _as_str_array("doc_id", doc_id).astype(object, copy=False)
        relevance = _as_float_array("relevance", relevance)
        _check_same_length(qid=qid, doc_id=doc_id, relevance=relevance)
        bad = np.flatnonzero(~np.isfinite(relevance))
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"relevance of (qid {qid[i]!r}, doc_id {doc_id[i]!r}) is {relevance[i]}, "
                             f"not a finite number")
        return cls(qid, doc_id, relevance, layout)

    def __reduce__(self):
        return (Judgements, (self._qid, self._doc_id, self._relevance, self.layout))

    def _build_tables(self) -> _Tables:
        n = len(self._qid)
        if n == 0:
            empty = np.zeros(0, dtype=np.int64)
            return _Tables(np.zeros(0, dtype=object), empty, empty, empty, empty, empty)
        query, n_queries = _group_codes(self._qid)  # exact, numbered by first appearance
        _, firsts = np.unique(query, return_index=True)
        by_query = np.lexsort((-self._relevance, query))
        sizes = np.bincount(query, minlength=n_queries)
        relevant = np.bincount(query[self._relevance > 0], minlength=n_queries)
        return _Tables(self._qid[firsts], query, np.cumsum(sizes) - sizes, sizes, by_query, relevant)

    # ------------------------------------------------------------------ what the metrics use

    def __len__(self) -> int:
        """Number of judgements (judged pairs)."""
        return len(self._qid)

    @property
    def n_queries(self) -> int:
        """Number of judged queries (distinct qids)."""
        return len(self._tables.qids)

    @property
    def qids(self) -> np.ndarray:
        """The distinct judged qids (object array), in order of first appearance."""
        return self._tables.qids.copy()

    def relevance(self, qid, doc_id) -> np.ndarray:
        """Judged relevance of each (qid, doc_id) row as float64, NaN where it is not judged."""
        match = self.match(qid, doc_id)
        out = np.full(len(match), np.nan)
        hit = match >= 0
        out[hit] = self._relevance[match[hit]]
        return out

    def match(self, qid, doc_id) -> np.ndarray:
        """Judgement number (0..len-1) of each (qid, doc_id) row, -1 where it is not judged."""
        qid = _as_str_array("qid", qid)
        doc_id = _as_str_array("doc_id", doc_id)
        _check_same_length(qid=qid, doc_id=doc_id)
        return self._pairs.find((qid, doc_id))

    def relevance_of(self, match: np.ndarray) -> np.ndarray:
        """Relevance of judgement numbers from `match` (which must all be >= 0)."""
        return self._relevance[match]

    def query_index(self, qids) -> np.ndarray:
        """Judged-query number (0..n_queries-1) of each qid, -1 for a qid without judgements."""
        return self._queries.find((_as_str_array("qids", qids),))

    def relevant_counts(self, query_index: np.ndarray) -> np.ndarray:
        """Number of relevant (relevance > 0) judgements of each judged query (int64)."""
        return self._tables.relevant[query_index]

    def top_judgements(self, query_index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The min(k, judgements) highest relevances of each given judged query, for the ideal DCG.

        Returns aligned arrays (which, position, relevance): `which` indexes `query_index` (the
        i-th given query), `position` is 1-based within that query (relevance descending).
        Costs O(len(query_index) * k), not O(len(self)), so bucket-wise metrics stay cheap."""
        t = self._tables
        counts = np.minimum(t.sizes[query_index], k)
        total = int(counts.sum())
        which = np.repeat(np.arange(len(query_index), dtype=np.int64), counts)
        offsets = np.cumsum(counts) - counts
        position = np.arange(total, dtype=np.int64) - offsets[which]  # 0-based
        rows = t.by_query[t.starts[query_index][which] + position]
        return which, position + 1, self._relevance[rows]

    def queries_missing(self, seen_qids) -> int:
        """Judged queries whose qid is not among `seen_qids` (trec_eval skips such queries)."""
        if not isinstance(seen_qids, np.ndarray):
            seen_qids = np.array(list(seen_qids), dtype=object)
        seen = self.query_index(seen_qids)
        return self.n_queries - len(np.unique(seen[seen >= 0]))

    def summary(self) -> dict[str, int | str | None]:
        """Counts for the report (builtin types): judgements, queries, relevant judgements
        (relevance > 0), judged queries without a relevant one, and the layout."""
        relevant = self._tables.relevant
        return {"layout": self.layout, "judgements": len(self), "queries": self.n_queries,
                "relevant_judgements": int(relevant.sum()), "queries_without_relevant": int((relevant == 0).sum())}

    def __repr__(self) -> str:
        return f"Judgements({len(self)} judgements, {self.n_queries} queries)"
