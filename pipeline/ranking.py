"""Per-query ranking and ranking metrics (MRR@k, NDCG@k, PNR) in plain, vectorised numpy.

Batch inference produces millions of (qid, doc_id, score) rows, and a single query may have
100,000 candidates, so nothing here loops over rows or compares all pairs of a query:

* qids are grouped by hashing each string once and sorting 64-bit integers: sorting
  millions of Python strings directly takes seconds;
* the within-query order is one integer sort of (query, score) packed into one int64 key;
  the doc_id tie-break sorts only rows whose scores actually tie, usually almost none;
* PNR counts correctly/wrongly ordered pairs without listing them: tied pairs from run
  lengths, correct pairs as an inversion count along the score order (a cumulative count per
  label value when there are few distinct labels, otherwise a merge sort over all rows).

The metrics rank documents exactly as ``rank_per_query`` does, so they can always be
reproduced from the ranks that were written out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["RankingMetrics", "rank_per_query", "ranking_metrics"]

_LN2 = math.log(2.0)

# Up to this many distinct label values, PNR counts correct pairs with one cumulative sum per
# label value (O(n) each); beyond it the O(n log^2 n) merge count is cheaper. About 20 merge
# levels for a million rows each cost roughly what two or three cumulative passes cost.
_MAX_LABELS_FOR_CUMSUM = 32


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
    order: np.ndarray  # rows by (query, score desc, doc_id, row index)
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
    _sort_tie_runs(order, key, lambda rows: _doc_id_codes(doc_id[rows]))
    return _Ranked(order, _ranks_from_order(order, group, n_groups), group, n_groups, key)


def rank_per_query(
    qid: np.ndarray, doc_id: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rank the candidates of every query by score.

    Returns ``(order, rank)``. ``order`` is an int64 permutation of row indices listing rows
    grouped by qid (qids in order of first appearance, so output follows input), within a qid
    by score descending, ties broken by doc_id ascending (string comparison by code point) so
    that the result does not depend on the order the rows arrived in; rows equal in qid, score
    and doc_id keep input order. ``rank`` is int64, the 1-based rank of each row within its
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


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class RankingMetrics:
    """Ranking quality over a set of queries.

    mrr_at_10: mean reciprocal rank of the first relevant (label > 0) doc within the top k,
        averaged over ALL queries: a query without a relevant doc (or without one in the top
        k) contributes 0, so the denominator does not depend on the model.
        None only when there are no queries.
    ndcg_at_10: mean NDCG@k; gain 2**label - 1, discount log2(rank + 1), ideal DCG from the
        query's own labels. Queries whose ideal DCG is 0 are exactly those without a relevant
        doc; NDCG is undefined for them, so they are left out of this mean and counted in
        queries_without_relevant. None when no query has a relevant doc.
    pnr: pairs_correct / pairs_wrong summed over all queries; None when pairs_wrong == 0.
    pairs_*: a pair is two docs of the same query with different labels (all docs of the
        query, not only the top k). Correct: the higher label has the higher score; wrong:
        the lower label has the higher score; tied: equal scores, neither correct nor wrong.
    queries: queries with at least one row whose label is not NaN.
    k: the cut-off actually used (the field names say 10 because that is the default).
    """

    mrr_at_10: float | None
    ndcg_at_10: float | None
    pnr: float | None
    pairs_correct: int
    pairs_wrong: int
    pairs_tied: int
    queries: int
    queries_without_relevant: int
    k: int = 10

    def to_dict(self) -> dict[str, float | int | None]:
        """Plain dict for JSON: builtin types only, and any non-finite float becomes None."""
        out: dict[str, float | int | None] = {}
        for key, value in asdict(self).items():
            if isinstance(value, (float, np.floating)):
                value = float(value) if math.isfinite(value) else None
            elif isinstance(value, (int, np.integer)):
                value = int(value)
            out[key] = value
        return out


def _gain(label: np.ndarray) -> np.ndarray:
    """2**label - 1, via expm1 so that every label > 0, however tiny, has a gain > 0.

    That keeps "ideal DCG == 0" and "no relevant doc" the very same set of queries.
    """
    with np.errstate(over="ignore"):
        return np.expm1(label * _LN2)


def _dcg_by_group(
    group: np.ndarray, n_groups: int, rank: np.ndarray, gain: np.ndarray, k: int
) -> np.ndarray:
    top = rank <= k
    weights = gain[top] / np.log2(rank[top] + 1.0)
    return np.bincount(group[top], weights=weights, minlength=n_groups)


def _equal_run_pairs(*sorted_keys: np.ndarray) -> int:
    """Sum of C(c, 2) over runs of adjacent positions that are equal in every key."""
    n = len(sorted_keys[0])
    if n < 2:
        return 0
    new_run = np.zeros(n, dtype=bool)
    new_run[0] = True
    for key in sorted_keys:
        new_run[1:] |= key[1:] != key[:-1]
    counts = np.diff(np.append(np.flatnonzero(new_run), n))
    return int((counts * (counts - 1) // 2).sum())


def _count_ascending_pairs(keys: np.ndarray) -> int:
    """Number of index pairs i < j with keys[i] < keys[j] (strictly), in O(n log^2 n).

    Bottom-up merge sort over the whole array: at level L the array is sorted inside blocks of
    2**L, and every element of a right block counts the smaller elements of its left partner
    with one global np.searchsorted (the block number in the high bits keeps blocks apart).
    Each pair i < j is counted once, at the level where their two blocks merge. The merge
    itself is a stable sort, which numpy (timsort) does in linear time on two sorted runs.
    """
    n = len(keys)
    if n < 2:
        return 0
    vals = keys.astype(np.int64) - int(keys.min())
    value_bits = max(int(vals.max()).bit_length(), 1)
    if value_bits + n.bit_length() > 62:
        raise OverflowError("too many rows or too wide keys for the int64 merge count")
    mask = (1 << value_bits) - 1
    pos = np.arange(n, dtype=np.int64)
    total = 0
    level = 0
    while (1 << level) < n:
        block = pos >> (level + 1)
        composite = (block << value_bits) | vals
        is_right = ((pos >> level) & 1).astype(bool)
        left = composite[~is_right]  # left blocks in block order: globally sorted
        smaller = np.searchsorted(left, composite[is_right], side="left")
        # the left block of block b starts at index b * 2**level of `left`
        total += int(smaller.sum()) - int((block[is_right] << level).sum())
        composite.sort(kind="stable")  # blocks occupy disjoint key ranges: this merges them
        vals = composite & mask
        level += 1
    return total


def _count_lower_label_before(group_seq: np.ndarray, label_seq: np.ndarray, n_labels: int) -> int:
    """Pairs of positions i < j in the same (contiguous) group with label_seq[i] < label_seq[j].

    Same result as _count_ascending_pairs restricted to groups, with one O(n) cumulative count
    per label value: much faster when there are only a few label values (graded 0..4).
    """
    n = len(group_seq)
    group_start = np.concatenate(([True], group_seq[1:] != group_seq[:-1]))
    start_pos = np.maximum.accumulate(np.where(group_start, np.arange(n), 0))
    total = 0
    for value in range(n_labels - 1):  # nothing ranks above the top label
        is_value = label_seq == value
        before = np.cumsum(is_value) - is_value  # rows with this label before each position
        within_group = before - before[start_pos]
        total += int(within_group[label_seq > value].sum())
    return total


def _pair_counts(ranked: _Ranked, label_code: np.ndarray, n_labels: int) -> tuple[int, int, int]:
    """(correct, wrong, tied) counts over pairs of same-query docs with different labels.

    Walk the rows by (query, score ascending) with equal scores ordered by label DEScending.
    Then a same-query pair at positions i < j with label_i < label_j always has
    score_i < score_j (an equal score would have put the higher label first): it is exactly a
    correct pair. So correct = ascending label pairs within queries; tied pairs come from run
    lengths (same score minus same score and label); wrong is what remains.
    """
    group = ranked.group
    n = len(group)
    if n < 2:
        return 0, 0, 0
    # reversed rank order: queries descending, score ascending
    seq = ranked.order[::-1].copy()
    _sort_tie_runs(seq, ranked.key, lambda rows: -label_code[rows])
    key_seq, label_seq, group_seq = ranked.key[seq], label_code[seq], group[seq]
    tied = _equal_run_pairs(key_seq) - _equal_run_pairs(key_seq, label_seq)

    sizes = np.bincount(group, minlength=ranked.n_groups)
    _, same_label = np.unique(group * n_labels + label_code, return_counts=True)
    all_pairs = int((sizes * (sizes - 1) // 2).sum() - (same_label * (same_label - 1) // 2).sum())

    if n_labels <= _MAX_LABELS_FOR_CUMSUM:
        correct = _count_lower_label_before(group_seq, label_seq, n_labels)
    else:
        # Queries come in DEScending code order, so with keys ordered by (query, label) a pair
        # across queries is never ascending: only same-query pairs are counted.
        _, dense = np.unique(group_seq * n_labels + label_seq, return_inverse=True)
        correct = _count_ascending_pairs(dense.reshape(-1))
    return correct, all_pairs - tied - correct, tied


def ranking_metrics(
    qid: np.ndarray,
    doc_id: np.ndarray,
    label: np.ndarray,
    score: np.ndarray,
    k: int = 10,
) -> RankingMetrics:
    """MRR@k, NDCG@k and PNR of `score` against graded `label` (relevant means label > 0).

    Rows with a NaN label are unlabeled and ignored entirely (their score may be NaN too); a
    query all of whose labels are NaN is not counted. Docs are ranked as `rank_per_query`
    ranks them (score descending, ties by doc_id), so tied scores get a reproducible position
    rather than an optimistic or pessimistic one. Labels must be finite and >= 0: a negative
    gain would make NDCG meaningless, so it is rejected rather than clipped.
    """
    qid = _as_str_array("qid", qid)
    doc_id = _as_str_array("doc_id", doc_id)
    label = _as_float_array("label", label)
    score = _as_float_array("score", score)
    _check_same_length(qid=qid, doc_id=doc_id, label=label, score=score)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = int(k)

    keep = ~np.isnan(label)
    if not keep.all():
        qid, doc_id, label, score = qid[keep], doc_id[keep], label[keep], score[keep]
    if np.isinf(label).any() or (label < 0).any():
        raise ValueError("labels must be finite and >= 0 (or NaN for unlabeled rows)")

    ranked = _rank(qid, doc_id, score)
    group, n_groups = ranked.group, ranked.n_groups
    if n_groups == 0:
        return RankingMetrics(None, None, None, 0, 0, 0, 0, 0, k)

    # MRR: the best rank of a relevant doc per query; 0 if it is beyond k or there is none.
    relevant = label > 0
    best = np.full(n_groups, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best, group[relevant], ranked.rank[relevant])
    has_relevant = best != np.iinfo(np.int64).max
    reciprocal = np.where(best <= k, 1.0 / best, 0.0)
    mrr = float(reciprocal.sum() / n_groups)

    # NDCG: DCG of the model's order over DCG of the order by label. Within the ideal order
    # equal labels have equal gains, so sorting (query, label) ascending and counting ideal
    # ranks from each query's end is enough.
    gain = _gain(label)
    if not np.isfinite(gain).all():
        raise ValueError("labels too large: 2**label overflows float64")
    label_code, n_labels = _dense_codes(label)
    by_label = np.argsort(group * n_labels + label_code)
    sizes = np.bincount(group, minlength=n_groups)
    ideal_rank = sizes[group] + 1 - _ranks_from_order(by_label, group, n_groups)
    ideal = _dcg_by_group(group, n_groups, ideal_rank, gain, k)
    if not np.isfinite(ideal).all():
        raise ValueError("labels too large: DCG overflows float64")
    dcg = _dcg_by_group(group, n_groups, ranked.rank, gain, k)
    defined = ideal > 0  # == has_relevant, see _gain
    ndcg = float(np.mean(dcg[defined] / ideal[defined])) if defined.any() else None

    correct, wrong, tied = _pair_counts(ranked, label_code, n_labels)
    return RankingMetrics(
        mrr_at_10=mrr,
        ndcg_at_10=ndcg,
        pnr=correct / wrong if wrong > 0 else None,
        pairs_correct=correct,
        pairs_wrong=wrong,
        pairs_tied=tied,
        queries=n_groups,
        queries_without_relevant=int(n_groups - has_relevant.sum()),
        k=k,
    )


def combine_metrics(parts: list[RankingMetrics]) -> RankingMetrics:
    """Metrics over disjoint sets of queries combined into the metrics of their union (so the
    ranking can be computed bucket by bucket): means weighted by the queries they average over,
    pair counts summed."""
    parts = [p for p in parts if p.queries]
    if not parts:
        return RankingMetrics(None, None, None, 0, 0, 0, 0, 0)
    k = parts[0].k
    assert all(p.k == k for p in parts), "cannot combine metrics of different cut-offs"
    queries = sum(p.queries for p in parts)
    with_rel = [(p.queries - p.queries_without_relevant, p.ndcg_at_10) for p in parts]
    n_rel = sum(n for n, _ in with_rel)
    correct = sum(p.pairs_correct for p in parts)
    wrong = sum(p.pairs_wrong for p in parts)
    return RankingMetrics(
        mrr_at_10=sum(p.mrr_at_10 * p.queries for p in parts) / queries,
        ndcg_at_10=sum(n * v for n, v in with_rel if n) / n_rel if n_rel else None,
        pnr=correct / wrong if wrong > 0 else None,
        pairs_correct=correct,
        pairs_wrong=wrong,
        pairs_tied=sum(p.pairs_tied for p in parts),
        queries=queries,
        queries_without_relevant=queries - n_rel,
        k=k,
    )
