"""Ranking metrics (MRR@k, NDCG@k, PNR) in plain, vectorised numpy, and their combination
over disjoint sets of queries (the final ranking is computed bucket by bucket).

Documents are ranked exactly as ``rank_per_query`` ranks them (pipeline.ranking.order), so the
metrics can always be reproduced from the ranks that were written out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.ranking.order import (_as_float_array, _as_str_array, _check_same_length, _dense_codes, _rank,
                                    _Ranked, _ranks_from_order)
from pipeline.ranking.pairs import _pair_counts

__all__ = ["RankingMetrics", "combine_metrics", "ranking_metrics"]

_LN2 = math.log(2.0)


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


def _mrr(ranked: _Ranked, relevant: np.ndarray, k: int) -> tuple[float, int]:
    """Mean over all queries of 1 / (best rank of a relevant doc), 0 if beyond k or none;
    and the number of queries that have a relevant doc."""
    best = np.full(ranked.n_groups, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best, ranked.group[relevant], ranked.rank[relevant])
    has_relevant = best != np.iinfo(np.int64).max
    reciprocal = np.where(best <= k, 1.0 / best, 0.0)
    return float(reciprocal.sum() / ranked.n_groups), int(has_relevant.sum())


def _ndcg(ranked: _Ranked, label: np.ndarray, label_code: np.ndarray, n_labels: int, k: int) -> float | None:
    """DCG of the model's order over DCG of the order by label, averaged over the queries with
    a relevant doc. Within the ideal order equal labels have equal gains, so sorting
    (query, label) ascending and counting ideal ranks from each query's end is enough."""
    group, n_groups = ranked.group, ranked.n_groups
    gain = _gain(label)
    if not np.isfinite(gain).all():
        raise ValueError("labels too large: 2**label overflows float64")
    by_label = np.argsort(group * n_labels + label_code)
    sizes = np.bincount(group, minlength=n_groups)
    ideal_rank = sizes[group] + 1 - _ranks_from_order(by_label, group, n_groups)
    ideal = _dcg_by_group(group, n_groups, ideal_rank, gain, k)
    if not np.isfinite(ideal).all():
        raise ValueError("labels too large: DCG overflows float64")
    dcg = _dcg_by_group(group, n_groups, ranked.rank, gain, k)
    defined = ideal > 0  # == has a relevant doc, see _gain
    return float(np.mean(dcg[defined] / ideal[defined])) if defined.any() else None


def _checked_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


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
    k = _checked_k(k)

    keep = ~np.isnan(label)
    if not keep.all():
        qid, doc_id, label, score = qid[keep], doc_id[keep], label[keep], score[keep]
    if np.isinf(label).any() or (label < 0).any():
        raise ValueError("labels must be finite and >= 0 (or NaN for unlabeled rows)")

    ranked = _rank(qid, doc_id, score)
    if ranked.n_groups == 0:
        return RankingMetrics(None, None, None, 0, 0, 0, 0, 0, k)
    mrr, with_relevant = _mrr(ranked, label > 0, k)
    label_code, n_labels = _dense_codes(label)
    ndcg = _ndcg(ranked, label, label_code, n_labels, k)
    correct, wrong, tied = _pair_counts(ranked, label_code, n_labels)
    return RankingMetrics(
        mrr_at_10=mrr,
        ndcg_at_10=ndcg,
        pnr=correct / wrong if wrong > 0 else None,
        pairs_correct=correct,
        pairs_wrong=wrong,
        pairs_tied=tied,
        queries=ranked.n_groups,
        queries_without_relevant=ranked.n_groups - with_relevant,
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
