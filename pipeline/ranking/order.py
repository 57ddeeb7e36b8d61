"""The per-query order: group rows by qid, sort by score descending, break ties by doc_id.

* qids are grouped by hashing each string once and sorting 64-bit integers: sorting
  millions of Python strings directly takes seconds;
* the within-query order is one integer sort of (query, score) packed into one int64 key;
  the doc_id tie-break (descending, as trec_eval) sorts only rows whose scores actually tie,
  usually almost none.

`_rank` is shared with the metrics (pipeline.ranking.metrics), so they rank documents exactly
as ``rank_per_query`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["rank_per_query"]


# --------------------------------------------------------------------------- validation


def _as_str_array(name: str, values: np.ndarray) -> np.ndarray:
    """Return `values` as a 1-D array of str, rejecting anything whose order would be ill-defined.

    Object arrays must hold only `str`: ints or None mixed in would break the sort or be grouped
    in a way the caller did not intend, so we fail loudly instead of coercing.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "U":
        return arr
    if arr.dtype == object:
        kinds = set(map(type, arr.tolist()))
        if kinds <= {str}:
            return arr
        bad = sorted(t.__name__ for t in kinds - {str})
        raise TypeError(f"{name} must contain only str, found {', '.join(bad)}")
    raise TypeError(f"{name} must be an array of str (unicode or object dtype), got {arr.dtype}")


def _as_float_array(name: str, values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have the same length, got {lengths}")


# --------------------------------------------------------------------------- sorting helpers


def _string_hashes(values: np.ndarray) -> np.ndarray:
    """64-bit hashes of the strings; integers sort about 20x faster than Python strings.

    Python's str hash is salted per process. That is harmless: the group numbering built from
    it depends only on first appearance, and the caller detects collisions.
    """
    return np.fromiter(map(hash, values.tolist()), dtype=np.int64, count=len(values))


def _group_codes(qid: np.ndarray) -> tuple[np.ndarray, int]:
    """Number the distinct qids 0..G-1 in order of first appearance; return (codes, G)."""
    if len(qid) == 0:
        return np.zeros(0, dtype=np.int64), 0
    _, first, inverse = np.unique(_string_hashes(qid), return_index=True, return_inverse=True)
    if not np.array_equal(qid[first][inverse], qid):
        # A hash collision merged two different qids. Astronomically rare, but grouping must
        # be exact, so redo it with (slow) string comparisons.
        _, first, inverse = np.unique(qid.astype(object), return_index=True, return_inverse=True)
    # np.unique numbers the groups by sorted key; renumber them by where they first occur.
    by_first_seen = np.empty(len(first), dtype=np.int64)
    by_first_seen[np.argsort(first, kind="stable")] = np.arange(len(first), dtype=np.int64)
    return by_first_seen[inverse.reshape(-1)], len(first)


def _dense_codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Order-preserving integer codes 0..m-1 (equal values, including -0.0 and 0.0, share one).

    Replacing floats by small integers lets (query, value) pack into a single int64 sort key,
    which sorts several times faster than np.lexsort on two keys.
    """
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0
    order = np.argsort(values)
    sorted_values = values[order]
    new_value = np.empty(n, dtype=bool)
    new_value[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=new_value[1:])
    codes = np.empty(n, dtype=np.int64)
    codes[order] = np.cumsum(new_value) - 1
    return codes, int(codes[order[-1]]) + 1


def _group_starts(codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Offset of each group in an array sorted by group code."""
    counts = np.bincount(codes, minlength=n_groups)
    return np.cumsum(counts) - counts


def _ranks_from_order(order: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """1-based position of every row inside its group, given an order sorted by group."""
    rank = np.empty(len(order), dtype=np.int64)
    starts = _group_starts(codes, n_groups)
    rank[order] = np.arange(1, len(order) + 1, dtype=np.int64) - starts[codes[order]]
    return rank


def _sort_tie_runs(
    order: np.ndarray, key: np.ndarray, tie_break: Callable[[np.ndarray], np.ndarray]
) -> None:
    """Reorder, in place, each run of `order` whose rows have equal `key` by tie_break(rows).

    Only the rows inside tie runs are touched, so an expensive tie-break (string sorting) costs
    nothing when scores are real-valued and almost never tie. The sort is stable.
    """
    sorted_key = key[order]
    ties_prev = sorted_key[1:] == sorted_key[:-1]  # position i+1 ties with position i
    if not ties_prev.any():
        return
    in_tie = np.zeros(len(order), dtype=bool)
    in_tie[1:] = ties_prev
    in_tie[:-1] |= ties_prev
    positions = np.flatnonzero(in_tie)
    run_id = np.cumsum(np.concatenate(([True], ~ties_prev)))[positions]
    rows = order[positions]
    order[positions] = rows[np.lexsort((tie_break(rows), run_id))]


def _doc_id_codes(doc_id: np.ndarray) -> np.ndarray:
    """Codes that sort like the doc_id strings (by code point, as Python compares str).

    Converted to numpy unicode first because sorting object arrays calls Python per
    comparison; the price is numpy's rule that trailing NUL characters do not count.
    """
    _, codes = np.unique(np.asarray(doc_id, dtype=np.str_), return_inverse=True)
    return codes.reshape(-1)


@dataclass(frozen=True)
class _Ranked:
    order: np.ndarray  # rows by (query, score desc, doc_id desc, row index)
    rank: np.ndarray  # 1-based rank per input row
    group: np.ndarray  # query code per row, 0..n_groups-1 by first appearance
    n_groups: int
    key: np.ndarray  # int64 per row: equal iff same query and same score; order sorts by it


def _rank(qid: np.ndarray, doc_id: np.ndarray, score: np.ndarray) -> _Ranked:
    """Shared by rank_per_query and ranking_metrics (which reuses `key` for tied pairs)."""
    n_nan = int(np.isnan(score).sum())
    if n_nan:
        raise ValueError(f"score contains {n_nan} NaN value(s)")
    group, n_groups = _group_codes(qid)
    score_code, n_scores = _dense_codes(score)
    # group ascending, then score descending; at most n * n < 2**63 for any realistic n
    key = group * n_scores + (n_scores - 1 - score_code)
    order = np.argsort(key, kind="stable")
    # Ties by doc_id DESCENDING, as trec_eval breaks them (it sorts a query's run by score,
    # then by strcmp of the docnos, reversed), so ranks written to run.trec are trec_eval's and
    # trec_eval on run.trec computes the report's metrics.
    _sort_tie_runs(order, key, lambda rows: -_doc_id_codes(doc_id[rows]))
    return _Ranked(order, _ranks_from_order(order, group, n_groups), group, n_groups, key)


def rank_per_query(
    qid: np.ndarray, doc_id: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rank the candidates of every query by score.

    Returns ``(order, rank)``. ``order`` is an int64 permutation of row indices listing rows
    grouped by qid (qids in order of first appearance, so output follows input), within a qid
    by score descending, ties broken by doc_id descending (string comparison by code point, which
    is UTF-8 byte order: trec_eval's tie order) so that the result does not depend on the order
    the rows arrived in; rows equal in qid, score and doc_id keep input order. ``rank`` is int64, the 1-based rank of each row within its
    qid, aligned with the INPUT rows (``rank[i]`` is row i's rank).

    qid and doc_id are 1-D arrays of str (unicode or object dtype). NaN scores raise
    ValueError: sorting them first or last would silently hide a model or data bug.
    ``-0.0`` ties with ``0.0``; ``+-inf`` are ordinary values.
    """
    qid = _as_str_array("qid", qid)
    doc_id = _as_str_array("doc_id", doc_id)
    score = _as_float_array("score", score)
    _check_same_length(qid=qid, doc_id=doc_id, score=score)
    ranked = _rank(qid, doc_id, score)
    return ranked.order, ranked.rank
