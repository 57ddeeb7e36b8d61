"""Ranking metrics (MRR@k, NDCG@k with two gains, recall@K, PNR) in plain, vectorised numpy, and
their combination over disjoint sets of queries (the final ranking is computed bucket by bucket).

One semantics, trec_eval's (what `ir-measures` and `pytrec_eval` compute), on our ranking:

* Ranking. The documents of a query are ranked exactly as ``rank_per_query`` ranks them
  (pipeline.ranking.order: score descending, ties by doc_id descending in code-point order,
  which is trec_eval's tie order), so the metrics can always be reproduced from the ranks
  written out, and trec_eval on run.trec computes the same numbers. (ir-measures' RR@k, from its
  msmarco provider, breaks ties the other way.)
* Judgements come from the rows' labels (a finite label judges its row, NaN leaves it unjudged),
  or, with ``judgements=`` (qrels, `pipeline.ranking.judgements.Judgements`), from the qrels:
  the row labels are then ignored and a row's relevance is the qrels' value for its
  (qid, doc_id), the row being unjudged when the pair is not in the qrels.
* Unjudged rows are ranked and keep their positions, but are never relevant and have gain 0,
  as trec_eval treats documents missing from the qrels; they are counted (`unjudged_rows`).
* Queries evaluated: those with rows AND at least one judgement (trec_eval's run ∩ qrels).
  Every mean is over all of them; a query whose judgements hold no relevant document
  contributes 0 to NDCG, RR and recall (trec_eval does the same).
* Relevant means relevance > 0 (trec_eval's relevance_level 1 for integer grades). Row labels
  must be >= 0; qrels may hold negative relevance, which counts as 0 (gain 0, not relevant, and
  in PNR the same grade as 0), as in trec_eval.
* Ideal DCG: the query's k highest judgements, from the FULL qrels when given (so a relevant
  document missing from the candidates lowers NDCG and recall), else from its judged rows.

Rows are assumed to be distinct (qid, doc_id) pairs (the readers reject duplicates); a pair
present twice would be counted twice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from pipeline.ranking.judgements import Judgements
from pipeline.ranking.order import (_as_float_array, _as_str_array, _check_same_length, _dense_codes, _group_codes,
                                    _rank, _Ranked, _ranks_from_order)
from pipeline.ranking.pairs import _pair_counts

__all__ = ["RankingMetrics", "combine_metrics", "ranking_metrics", "ranking_metrics_per_query"]

_LN2 = math.log(2.0)


@dataclass(frozen=True)
class RankingMetrics:
    """Ranking quality over a set of queries (see the module docstring for the semantics).

    mrr_at_10: mean over the evaluated queries of 1 / rank of the first relevant doc within the
        top k, 0 when there is none. None only when no query is evaluated.
    ndcg_at_10: mean NDCG@k with the exponential gain 2**relevance - 1; ndcg_at_10_linear: the
        same with the linear gain relevance (trec_eval's ndcg_cut). Discount log2(rank + 1),
        ideal DCG from the query's k highest judgements (all qrels of the query when qrels are
        given). A query without a relevant judgement has NDCG 0. Both are None when no evaluated
        query has a relevant judgement at all (a score of 0 there would say nothing about the
        model; the int8 gate relies on this to refuse such data).
    recall, recall_k: only when asked (recall_k given): mean over the evaluated queries of
        relevant docs in the top recall_k / relevant judgements of the query (0 without any);
        None as for NDCG, or when not asked.
    pnr: pairs_correct / pairs_wrong summed over all queries; None when pairs_wrong == 0.
    pairs_*: a pair is two JUDGED docs of the same query with different relevance (all judged
        docs of the query, not only the top k; unjudged rows are in no pair). Correct: the higher
        relevance has the higher score; wrong: the lower one has; tied: equal scores.
    queries: evaluated queries (rows and at least one judgement).
    queries_without_relevant: evaluated queries without a relevant judgement (they count 0).
    k: the cut-off actually used (the field names say 10 because that is the default).
    unjudged_rows: rows of evaluated queries without a judgement (ranked, never relevant).
    queries_without_judgements: queries with rows but no judgement at all (not evaluated).
    judged_by: "labels" (the rows' labels) or "qrels" (a `Judgements` passed as judgements=).
    qrels_queries: with qrels, the number of judged queries in them; else None.
    qrels_queries_without_candidates: with qrels, judged queries with no row in this call
        (trec_eval skips them; ir-measures' calc_aggregate counts them as 0). combine_metrics
        recomputes it, so over buckets of whole queries it is the run's number. Else None.
    relevant_missing: with qrels, relevant judgements of the evaluated queries whose document is
        not among the candidates (each lowers NDCG and recall). Else None.
    NDCG_GAIN (class constant, "ndcg_gain" in to_dict): the two gains, in words, for the report.
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
    ndcg_at_10_linear: float | None = None
    recall: float | None = None
    recall_k: int | None = None
    unjudged_rows: int = 0
    queries_without_judgements: int = 0
    judged_by: str = "labels"
    qrels_queries: int | None = None
    qrels_queries_without_candidates: int | None = None
    relevant_missing: int | None = None

    NDCG_GAIN: ClassVar[str] = ("ndcg_at_10: gain 2**relevance - 1 (exponential); "
                                "ndcg_at_10_linear: gain relevance (linear, as trec_eval's ndcg_cut)")

    def to_dict(self) -> dict[str, float | int | str | None]:
        """Plain dict for JSON: builtin types only, and any non-finite float becomes None.
        Holds every field and "ndcg_gain" (NDCG_GAIN)."""
        out: dict[str, float | int | str | None] = {}
        for key, value in asdict(self).items():
            if isinstance(value, (float, np.floating)):
                value = float(value) if math.isfinite(value) else None
            elif isinstance(value, (int, np.integer)):
                value = int(value)
            out[key] = value
        out["ndcg_gain"] = self.NDCG_GAIN
        return out


def _gain(relevance: np.ndarray) -> np.ndarray:
    """2**relevance - 1, via expm1 so that every relevance > 0, however tiny, has a gain > 0."""
    with np.errstate(over="ignore"):
        gain = np.expm1(relevance * _LN2)
    if not np.isfinite(gain).all():
        raise ValueError("labels too large: 2**label overflows float64")
    return gain


def _dcg_by_group(group: np.ndarray, n_groups: int, rank: np.ndarray, gain: np.ndarray, k: int) -> np.ndarray:
    top = rank <= k
    weights = gain[top] / np.log2(rank[top] + 1.0)
    dcg = np.bincount(group[top], weights=weights, minlength=n_groups)
    if not np.isfinite(dcg).all():
        raise ValueError("labels too large: DCG overflows float64")
    return dcg


def _ideal_from_rows(group: np.ndarray, n_groups: int, relevance: np.ndarray, k: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group, 1-based ideal position, relevance) of every judged row: within the ideal order
    equal relevances have equal gains, so sorting (query, relevance) ascending and counting
    ideal positions from each query's end is enough."""
    code, n_codes = _dense_codes(relevance)
    by_relevance = np.argsort(group * n_codes + code, kind="stable")
    sizes = np.bincount(group, minlength=n_groups)
    position = sizes[group] + 1 - _ranks_from_order(by_relevance, group, n_groups)
    top = position <= k
    return group[top], position[top], relevance[top]


def _mean_or_none(per_query: np.ndarray, defined: bool) -> float | None:
    return float(per_query.mean()) if defined else None


def _checked_k(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name} must be a positive int, got {k!r}")
    return int(k)


def _judged_subset(ranked: _Ranked, judged: np.ndarray) -> _Ranked:
    """The ranking restricted to the judged rows (same relative order), for the pair counts."""
    if judged.all():
        return ranked
    new_index = np.cumsum(judged) - 1
    order = new_index[ranked.order[judged[ranked.order]]]
    return _Ranked(order, ranked.rank[judged], ranked.group[judged], ranked.n_groups, ranked.key[judged])


def ranking_metrics(
    qid: np.ndarray,
    doc_id: np.ndarray,
    label: np.ndarray,
    score: np.ndarray,
    k: int = 10,
    *,
    judgements: Judgements | None = None,
    recall_k: int | None = None,
) -> RankingMetrics:
    """See `ranking_metrics_per_query` (this returns its metrics only)."""
    return ranking_metrics_per_query(qid, doc_id, label, score, k, judgements=judgements, recall_k=recall_k)[0]


def ranking_metrics_per_query(
    qid: np.ndarray,
    doc_id: np.ndarray,
    label: np.ndarray,
    score: np.ndarray,
    k: int = 10,
    *,
    judgements: Judgements | None = None,
    recall_k: int | None = None,
) -> tuple[RankingMetrics, np.ndarray, np.ndarray]:
    """(metrics, qids, ndcg): the metrics, and the NDCG@k (exponential gain) of each evaluated
    query, in order of first appearance (what the run's report pages show per query).

    MRR@k, NDCG@k (exponential and linear gain), PNR and, when `recall_k` is given,
    recall@recall_k of `score`, against the rows' `label` or, when given, against `judgements`
    (qrels; the labels are then ignored). Semantics: module docstring.

    Rows of queries without any judgement are ignored (their score may be NaN); every other row
    is ranked, so its score must not be NaN. Row labels must be NaN or finite and >= 0 (a
    negative gain would make NDCG meaningless, so it is rejected rather than clipped).
    """
    qid = _as_str_array("qid", qid)
    doc_id = _as_str_array("doc_id", doc_id)
    label = _as_float_array("label", label)
    score = _as_float_array("score", score)
    _check_same_length(qid=qid, doc_id=doc_id, label=label, score=score)
    k = _checked_k(k)
    if recall_k is not None:
        recall_k = _checked_k(recall_k, "recall_k")

    if judgements is None:
        judged = ~np.isnan(label)
        relevance = np.where(judged, label, 0.0)  # unjudged rows: gain 0, never relevant
        if np.isinf(relevance).any() or (relevance < 0).any():
            raise ValueError("labels must be finite and >= 0 (or NaN for unlabeled rows)")
        match = None
    else:
        if not isinstance(judgements, Judgements):
            raise TypeError(f"judgements must be a Judgements, got {type(judgements).__name__}")
        match = judgements.match(qid, doc_id)
        judged = match >= 0
        relevance = np.zeros(len(qid))
        relevance[judged] = np.maximum(judgements.relevance_of(match[judged]), 0.0)

    # evaluated queries: rows and at least one judgement
    group, n_groups = _group_codes(qid)
    if judgements is None:
        evaluated = np.bincount(group[judged], minlength=n_groups) > 0
        query_index = None
    else:
        _, first_rows = np.unique(group, return_index=True)
        query_index = judgements.query_index(qid[first_rows])
        evaluated = query_index >= 0
        query_index = query_index[evaluated]
    n_evaluated = int(evaluated.sum())
    common = dict(k=k, recall_k=recall_k, queries_without_judgements=n_groups - n_evaluated,
                  judged_by="labels" if judgements is None else "qrels",
                  qrels_queries=None if judgements is None else judgements.n_queries,
                  qrels_queries_without_candidates=None if judgements is None else judgements.n_queries - n_evaluated)
    if n_evaluated == 0:
        return (RankingMetrics(None, None, None, 0, 0, 0, 0, 0, relevant_missing=None if judgements is None else 0,
                               **common), np.zeros(0, dtype=object), np.zeros(0))
    keep = evaluated[group]
    if not keep.all():
        qid, doc_id, score, relevance, judged = qid[keep], doc_id[keep], score[keep], relevance[keep], judged[keep]
        match = None if match is None else match[keep]
        group = (np.cumsum(evaluated) - 1)[group[keep]]

    ranked = _rank(qid, doc_id, score)
    # Removing whole queries keeps the order of first appearance, hence the query numbering.
    assert ranked.n_groups == n_evaluated and np.array_equal(ranked.group, group)
    n, rank = n_evaluated, ranked.rank
    relevant = judged & (relevance > 0)

    # ideal: the k highest judgements of each query
    if judgements is None:
        ideal_group, ideal_position, ideal_relevance = _ideal_from_rows(group[judged], n, relevance[judged], k)
        n_relevant = np.bincount(group[relevant], minlength=n)
        relevant_missing = None
    else:
        ideal_group, ideal_position, ideal_relevance = judgements.top_judgements(query_index, k)
        ideal_relevance = np.maximum(ideal_relevance, 0.0)
        n_relevant = judgements.relevant_counts(query_index)
        relevant_missing = int(n_relevant.sum()) - len(np.unique(match[relevant]))
    has_relevant = n_relevant > 0
    defined = bool(has_relevant.any())

    ndcg, ndcg_per_query = {}, {}
    for name, gain_of in (("exp", _gain), ("linear", lambda r: r)):
        dcg = _dcg_by_group(group, n, rank, gain_of(relevance), k)
        ideal = _dcg_by_group(ideal_group, n, ideal_position, gain_of(ideal_relevance), k)
        per_query = np.divide(dcg, ideal, out=np.zeros(n), where=ideal > 0)
        ndcg[name], ndcg_per_query[name] = _mean_or_none(per_query, defined), per_query

    best = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best, group[relevant], rank[relevant])
    mrr = float(np.where(best <= k, 1.0 / best, 0.0).mean())

    recall = None
    if recall_k is not None:
        retrieved = np.bincount(group[relevant & (rank <= recall_k)], minlength=n)
        recall = _mean_or_none(np.divide(retrieved, n_relevant, out=np.zeros(n), where=has_relevant), defined)

    code, n_codes = _dense_codes(relevance[judged])
    correct, wrong, tied = _pair_counts(_judged_subset(ranked, judged), code, n_codes)
    _, first_rows = np.unique(group, return_index=True)  # groups number queries by first appearance
    metrics = RankingMetrics(
        mrr_at_10=mrr,
        ndcg_at_10=ndcg["exp"],
        pnr=correct / wrong if wrong > 0 else None,
        pairs_correct=correct,
        pairs_wrong=wrong,
        pairs_tied=tied,
        queries=n,
        queries_without_relevant=n - int(has_relevant.sum()),
        ndcg_at_10_linear=ndcg["linear"],
        recall=recall,
        unjudged_rows=int(len(judged) - judged.sum()),
        relevant_missing=relevant_missing,
        **common,
    )
    return metrics, qid[first_rows], ndcg_per_query["exp"]


def _same(parts: list[RankingMetrics], field: str):
    values = {getattr(p, field) for p in parts}
    if len(values) > 1:
        raise ValueError(f"cannot combine metrics of different {field}: {sorted(values, key=repr)}")
    return values.pop()


def combine_metrics(parts: list[RankingMetrics]) -> RankingMetrics:
    """Metrics over disjoint sets of queries (e.g. buckets of whole queries, against the same
    labels or the same qrels) combined into the metrics of their union, equal to one
    `ranking_metrics` call over all their rows: means weighted by the queries they average over,
    counts summed, and qrels_queries_without_candidates recomputed from the total of queries."""
    if not parts:
        return RankingMetrics(None, None, None, 0, 0, 0, 0, 0)
    k, recall_k, judged_by, qrels_queries = (_same(parts, f) for f in ("k", "recall_k", "judged_by", "qrels_queries"))
    queries = sum(p.queries for p in parts)
    without_relevant = sum(p.queries_without_relevant for p in parts)
    defined = queries > without_relevant

    def mean(field: str) -> float | None:
        # a part whose NDCG/recall is None (no relevant judgement) contributes zeros
        total = sum(getattr(p, field) * p.queries for p in parts if p.queries and getattr(p, field) is not None)
        return total / queries if defined else None

    def total(field: str) -> int | None:
        values = [getattr(p, field) for p in parts]
        return None if any(v is None for v in values) else sum(values)

    correct = sum(p.pairs_correct for p in parts)
    wrong = sum(p.pairs_wrong for p in parts)
    return RankingMetrics(
        mrr_at_10=sum(p.mrr_at_10 * p.queries for p in parts if p.queries) / queries if queries else None,
        ndcg_at_10=mean("ndcg_at_10"),
        pnr=correct / wrong if wrong > 0 else None,
        pairs_correct=correct,
        pairs_wrong=wrong,
        pairs_tied=sum(p.pairs_tied for p in parts),
        queries=queries,
        queries_without_relevant=without_relevant,
        k=k,
        ndcg_at_10_linear=mean("ndcg_at_10_linear"),
        recall=mean("recall") if recall_k is not None else None,
        recall_k=recall_k,
        unjudged_rows=sum(p.unjudged_rows for p in parts),
        queries_without_judgements=sum(p.queries_without_judgements for p in parts),
        judged_by=judged_by,
        qrels_queries=qrels_queries,
        qrels_queries_without_candidates=None if qrels_queries is None else qrels_queries - queries,
        relevant_missing=total("relevant_missing"),
    )
