"""Tests for pipeline.ranking (order, pairs, metrics, judgements) against brute-force references
written with plain Python loops (tests/ranking/test_trec_eval.py compares with trec_eval itself).

The references enumerate every pair and compute every DCG term explicitly, deliberately sharing
no code or trick (hashing, lexsort, inversion counting) with the vectorised implementation.
"""

from __future__ import annotations

import json
import math
import pickle
from collections import defaultdict
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ranking import order as order_module
from pipeline.ranking import pairs
from pipeline.ranking import judgements as judgements_module
from pipeline.ranking import (DuplicateJudgement, Judgements, RankingMetrics, combine_metrics, rank_per_query,
                              ranking_metrics)

TOL = 1e-12


# --------------------------------------------------------------------------- references


def ref_order(rows: list[int], doc, score) -> list[int]:
    """rows by score descending, ties by doc_id descending (trec_eval's order), then row index:
    two stable sorts with Python's string comparison."""
    by_doc = sorted(rows, key=lambda i: doc[i], reverse=True)  # reverse=True keeps equal keys in order
    return sorted(by_doc, key=lambda i: -score[i])


def ref_rank(qid: list[str], doc: list[str], score: list[float]) -> tuple[list[int], list[int]]:
    groups: dict[str, list[int]] = {}  # dicts keep insertion order = first appearance
    for i, q in enumerate(qid):
        groups.setdefault(q, []).append(i)
    order: list[int] = []
    rank = [0] * len(qid)
    for rows in groups.values():
        ranked = ref_order(rows, doc, score)
        for r, i in enumerate(ranked, start=1):
            rank[i] = r
        order.extend(ranked)
    return order, rank


def ref_metrics(
    qid: list[str], doc: list[str], label: list[float], score: list[float], k: int = 10,
    qrels: dict[tuple[str, str], float] | None = None, recall_k: int | None = None,
) -> dict:
    """trec_eval's semantics, spelled out: every row of an evaluated query is ranked; a row's
    relevance is its label (NaN: unjudged) or, with `qrels`, the qrels' value (absent: unjudged);
    relevance <= 0 is gain 0 and not relevant; the ideal comes from the judged rows or all qrels."""
    if qrels is None:
        rel_of = {i: label[i] + 0.0 for i in range(len(qid)) if not math.isnan(label[i])}
    else:
        rel_of = {i: qrels[(qid[i], doc[i])] for i in range(len(qid)) if (qid[i], doc[i]) in qrels}
    judged_queries = {qid[i] for i in rel_of} if qrels is None else {q for q, _ in qrels}
    per_query: dict[str, list[int]] = defaultdict(list)
    for i in range(len(qid)):
        per_query[qid[i]].append(i)

    rr_sum = recall_sum = 0.0
    ndcg_sum = {"exp": 0.0, "lin": 0.0}
    gains = {"exp": lambda x: 2.0**x - 1, "lin": lambda x: x}
    evaluated = without_relevant = unjudged = relevant_missing = 0
    correct = wrong = tied = 0
    for q, rows in per_query.items():
        if q not in judged_queries:
            continue
        evaluated += 1
        ranked = ref_order(rows, doc, score)
        rels = [max(rel_of[i], 0.0) if i in rel_of else 0.0 for i in ranked]
        unjudged += sum(i not in rel_of for i in rows)
        if qrels is None:
            judged_rels = [max(rel_of[i], 0.0) for i in rows if i in rel_of]
        else:
            judged_rels = [max(r, 0.0) for (qq, _), r in qrels.items() if qq == q]
            candidates = {doc[i] for i in rows}
            relevant_missing += sum(1 for (qq, d), r in qrels.items() if qq == q and r > 0 and d not in candidates)
        n_rel = sum(1 for x in judged_rels if x > 0)
        without_relevant += n_rel == 0
        for pos, x in enumerate(rels[:k]):
            if x > 0:
                rr_sum += 1.0 / (pos + 1)
                break
        ideal = sorted(judged_rels, reverse=True)[:k]
        for name, g in gains.items():
            dcg = sum(g(x) / math.log2(pos + 2) for pos, x in enumerate(rels[:k]))
            idcg = sum(g(x) / math.log2(pos + 2) for pos, x in enumerate(ideal))
            ndcg_sum[name] += dcg / idcg if idcg > 0 else 0.0
        if recall_k is not None and n_rel:
            recall_sum += sum(1 for x in rels[:recall_k] if x > 0) / n_rel
        judged_rows = [i for i in rows if i in rel_of]
        for a in range(len(judged_rows)):
            for b in range(a + 1, len(judged_rows)):
                i, j = judged_rows[a], judged_rows[b]
                ri, rj = max(rel_of[i], 0.0), max(rel_of[j], 0.0)
                if ri == rj:
                    continue
                hi, lo = (i, j) if ri > rj else (j, i)
                if score[hi] > score[lo]:
                    correct += 1
                elif score[hi] < score[lo]:
                    wrong += 1
                else:
                    tied += 1
    defined = evaluated > without_relevant
    n_qrels_queries = len(judged_queries) if qrels is not None else None
    return {
        "mrr_at_10": rr_sum / evaluated if evaluated else None,
        "ndcg_at_10": ndcg_sum["exp"] / evaluated if defined else None,
        "pnr": correct / wrong if wrong else None,
        "pairs_correct": correct,
        "pairs_wrong": wrong,
        "pairs_tied": tied,
        "queries": evaluated,
        "queries_without_relevant": without_relevant,
        "k": k,
        "ndcg_at_10_linear": ndcg_sum["lin"] / evaluated if defined else None,
        "recall": recall_sum / evaluated if defined and recall_k is not None else None,
        "recall_k": recall_k,
        "unjudged_rows": unjudged,
        "queries_without_judgements": len(per_query) - evaluated,
        "judged_by": "labels" if qrels is None else "qrels",
        "qrels_queries": n_qrels_queries,
        "qrels_queries_without_candidates": None if qrels is None else n_qrels_queries - evaluated,
        "relevant_missing": None if qrels is None else relevant_missing,
        "ndcg_gain": RankingMetrics.NDCG_GAIN,
    }


def assert_metrics_equal(got: RankingMetrics, want: dict) -> None:
    got_d = got.to_dict()
    assert got_d.keys() == want.keys()
    for key, w in want.items():
        g = got_d[key]
        if w is None or g is None:
            assert g is None and w is None, (key, g, w)
        elif isinstance(w, float):
            assert math.isclose(g, w, rel_tol=TOL, abs_tol=TOL), (key, g, w)
        else:
            assert g == w, (key, g, w)


def arrays(qid, doc, label=None, score=None):
    out = [np.array(qid, dtype=object), np.array(doc, dtype=object)]
    if label is not None:
        out.append(np.array(label, dtype=np.float64))
    if score is not None:
        out.append(np.array(score, dtype=np.float64))
    return out


# --------------------------------------------------------------------------- rank_per_query


def test_rank_grouping_tie_break_and_alignment() -> None:
    qid = ["b", "a", "b", "a", "c", "b"]
    doc = ["x", "y", "a", "b", "z", "m"]
    score = [1.0, 2.0, 1.0, 2.0, 0.0, 5.0]
    order, rank = rank_per_query(*arrays(qid, doc), np.array(score))
    # b first (first seen), then a, then c; ties by doc_id descending; rank aligned with input rows
    assert order.tolist() == [5, 0, 2, 1, 3, 4]
    assert rank.tolist() == [2, 1, 3, 2, 1, 1]
    assert order.dtype == np.int64 and rank.dtype == np.int64


def test_rank_doc_id_compares_as_string_and_accepts_unicode_dtype() -> None:
    qid = np.array(["q"] * 4)  # unicode dtype
    doc = np.array(["9", "10", "1", "é"])
    order, rank = rank_per_query(qid, doc, np.zeros(4))
    assert order.tolist() == [3, 0, 1, 2]  # descending: "é" > "9" > "10" > "1"
    assert rank.tolist() == [2, 3, 4, 1]


def test_rank_negative_zero_ties_with_zero_and_inf_allowed() -> None:
    qid, doc = arrays(["q"] * 4, ["b", "a", "c", "d"])
    order, _ = rank_per_query(qid, doc, np.array([0.0, -0.0, np.inf, -np.inf]))
    assert order.tolist() == [2, 0, 1, 3]


def test_rank_duplicate_rows_keep_input_order() -> None:
    qid, doc = arrays(["q", "q", "q"], ["a", "a", "a"])
    order, rank = rank_per_query(qid, doc, np.ones(3))
    assert order.tolist() == [0, 1, 2] and rank.tolist() == [1, 2, 3]


def test_rank_rejects_bad_input() -> None:
    qid, doc = arrays(["q", "q"], ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        rank_per_query(qid, doc, np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="same length"):
        rank_per_query(qid, doc, np.array([1.0]))
    with pytest.raises(TypeError):
        rank_per_query(np.array(["q", 1], dtype=object), doc, np.ones(2))
    with pytest.raises(TypeError):
        rank_per_query(np.array([1, 2]), doc, np.ones(2))


def test_rank_empty() -> None:
    empty = np.array([], dtype=object)
    order, rank = rank_per_query(empty, empty, np.array([]))
    assert order.shape == rank.shape == (0,)


def test_rank_survives_hash_collisions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouping must stay exact even if every qid hashes to the same value."""
    monkeypatch.setattr(order_module, "_string_hashes", lambda v: np.zeros(len(v), dtype=np.int64))
    qid = ["b", "a", "b", "c", "a"]
    doc = ["1", "2", "3", "4", "5"]
    score = [0.1, 0.2, 0.3, 0.4, 0.5]
    order, rank = rank_per_query(*arrays(qid, doc), np.array(score))
    want_order, want_rank = ref_rank(qid, doc, score)
    assert order.tolist() == want_order and rank.tolist() == want_rank


# --------------------------------------------------------------------------- hand cases


def test_metrics_hand_case() -> None:
    # q1: a(.9, 0) g(.85, unjudged) b(.8, 2) c(.7, 1) -> g keeps rank 2, so the first relevant
    #     doc is at rank 3; pairs (judged only): (b,a) wrong, (c,a) wrong, (b,c) correct
    # q2: d(.5, 0) e(.5, 0)            -> no relevant doc: 0 in every mean, no pairs
    # q3: f(.1, 1)                     -> relevant at rank 1, NDCG 1
    # q4: h, only unjudged (NaN label, even a NaN score) -> not evaluated
    qid = ["q1", "q2", "q1", "q3", "q1", "q2", "q1", "q4"]
    doc = ["a", "d", "b", "f", "c", "e", "g", "h"]
    label = [0, 0, 2, 1, 1, 0, np.nan, np.nan]
    score = [0.9, 0.5, 0.8, 0.1, 0.7, 0.5, 0.85, np.nan]
    m = ranking_metrics(*arrays(qid, doc, label, score), recall_k=2)
    ndcg_q1 = (3 / 2 + 1 / math.log2(5)) / (3 + 1 / math.log2(3))
    ndcg_q1_linear = (2 / 2 + 1 / math.log2(5)) / (2 + 1 / math.log2(3))
    assert math.isclose(ndcg_q1, 0.5317306, rel_tol=1e-6)
    assert math.isclose(m.mrr_at_10, (1 / 3 + 0 + 1) / 3, rel_tol=TOL)
    assert math.isclose(m.ndcg_at_10, (ndcg_q1 + 0 + 1) / 3, rel_tol=TOL)
    assert math.isclose(m.ndcg_at_10_linear, (ndcg_q1_linear + 0 + 1) / 3, rel_tol=TOL)
    assert math.isclose(m.recall, (0 / 2 + 0 + 1) / 3, rel_tol=TOL) and m.recall_k == 2
    assert (m.pairs_correct, m.pairs_wrong, m.pairs_tied) == (1, 2, 0)
    assert m.pnr == 0.5
    assert (m.queries, m.queries_without_relevant, m.k) == (3, 1, 10)
    assert (m.unjudged_rows, m.queries_without_judgements, m.judged_by) == (1, 1, "labels")
    assert m.qrels_queries is m.qrels_queries_without_candidates is m.relevant_missing is None


def test_metrics_hand_case_qrels() -> None:
    # The same rows against qrels: the labels are ignored. q1's qrels also judge z (3, not a
    # candidate: the ideal DCG has it, so NDCG and recall drop) and call a -1 (counts as 0);
    # c is unjudged now; q3 is not in the qrels (not evaluated); q5 has qrels but no rows.
    qid = ["q1", "q2", "q1", "q3", "q1", "q2", "q1"]
    doc = ["a", "d", "b", "f", "c", "e", "g"]
    label = [np.nan, -5, np.inf, 1, 1, 0, 7]  # ignored with qrels, even invalid ones
    score = [0.9, 0.5, 0.8, 0.1, 0.7, 0.5, 0.85]
    qrels = {("q1", "a"): -1, ("q1", "b"): 2, ("q1", "z"): 3, ("q1", "g"): 0, ("q2", "d"): 0, ("q5", "x"): 1}
    j = Judgements.from_arrays(*arrays([q for q, _ in qrels], [d for _, d in qrels]), list(qrels.values()))
    m = ranking_metrics(*arrays(qid, doc, label, score), judgements=j, recall_k=10)
    # q1 ranked a(0) g(0) b(2) c(unjudged); ideal z(3) b(2)
    ndcg_q1 = (3 / 2) / (7 + 3 / math.log2(3))
    ndcg_q1_linear = (2 / 2) / (3 + 2 / math.log2(3))
    assert math.isclose(m.ndcg_at_10, ndcg_q1 / 2, rel_tol=TOL)
    assert math.isclose(m.ndcg_at_10_linear, ndcg_q1_linear / 2, rel_tol=TOL)
    assert math.isclose(m.mrr_at_10, (1 / 3) / 2, rel_tol=TOL)
    assert math.isclose(m.recall, (1 / 2) / 2, rel_tol=TOL)
    # judged q1 pairs: b (2) below a and g (0): wrong; q2: d (0) and e (unjudged): none
    assert (m.pairs_correct, m.pairs_wrong, m.pairs_tied) == (0, 2, 0) and m.pnr == 0.0
    assert (m.queries, m.queries_without_relevant, m.unjudged_rows, m.queries_without_judgements) == (2, 1, 2, 1)
    assert (m.judged_by, m.qrels_queries, m.qrels_queries_without_candidates, m.relevant_missing) == \
        ("qrels", 3, 1, 1)
    assert_metrics_equal(m, ref_metrics(qid, doc, label, score, qrels=qrels, recall_k=10))


def test_metrics_hand_case_ties_and_cutoff() -> None:
    # one query, k=2. Ranked: x(3, 0) then y(1, 1) and z(1, 0) tie on score -> doc_id descending
    # puts z before y, so the relevant doc is at rank 3 > k: RR 0 and DCG@2 0. Pairs: (y,x)
    # wrong, (y,z) tied.
    qid, doc, label, score = arrays(["q"] * 3, ["x", "y", "z"], [0, 1, 0], [3, 1, 1])
    m = ranking_metrics(qid, doc, label, score, k=2)
    assert m.mrr_at_10 == 0.0 and m.ndcg_at_10 == 0.0
    assert (m.pairs_correct, m.pairs_wrong, m.pairs_tied) == (0, 1, 1)
    assert m.pnr == 0.0
    assert m.to_dict()["k"] == 2


def test_metrics_no_wrong_pairs_and_no_relevant_gives_none() -> None:
    """No relevant judgement anywhere: NDCG and recall are None (trec_eval would say 0, which says
    nothing about the model; the int8 gate refuses such rows on that None); MRR is 0."""
    qid, doc, label, score = arrays(["q", "q"], ["a", "b"], [0, 0], [1, 2])
    m = ranking_metrics(qid, doc, label, score, recall_k=5)
    assert m.pnr is None and m.ndcg_at_10 is None and m.ndcg_at_10_linear is None and m.mrr_at_10 == 0.0
    assert m.recall is None and m.recall_k == 5
    assert m.queries_without_relevant == 1
    d = m.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["pnr"] is None and d["ndcg_at_10"] is None
    # one query with a relevant doc makes them defined, and the other one counts 0
    qid, doc, label, score = arrays(["q", "q", "r"], ["a", "b", "c"], [0, 0, 1], [1, 2, 3])
    m = ranking_metrics(qid, doc, label, score, recall_k=5)
    assert m.ndcg_at_10 == m.ndcg_at_10_linear == m.recall == m.mrr_at_10 == 0.5


def test_metrics_empty_and_all_unlabeled() -> None:
    for label in ([], [np.nan, np.nan]):
        n = len(label)
        m = ranking_metrics(*arrays(["q"] * n, ["d"] * n, label, [np.nan] * n))
        assert m.queries == 0 and m.mrr_at_10 is None and m.ndcg_at_10 is None
        assert m.queries_without_judgements == (1 if n else 0) and m.unjudged_rows == 0
        json.dumps(m.to_dict(), allow_nan=False)
    j = Judgements.from_arrays(*arrays(["q"], ["d"]), [1])
    m = ranking_metrics(*arrays(["r"], ["d"], [1], [np.nan]), judgements=j)
    assert (m.queries, m.qrels_queries, m.qrels_queries_without_candidates, m.relevant_missing) == (0, 1, 1, 0)
    assert m.mrr_at_10 is None and m.judged_by == "qrels"


def test_metrics_rejects_bad_input() -> None:
    qid, doc = arrays(["q", "q"], ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        ranking_metrics(qid, doc, np.array([1.0, 0.0]), np.array([np.nan, 1.0]))
    for bad_label in ([-1.0, 0.0], [np.inf, 0.0], [2000.0, 0.0]):
        with pytest.raises(ValueError, match="label"):
            ranking_metrics(qid, doc, np.array(bad_label), np.ones(2))
    for bad_k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k"):
            ranking_metrics(qid, doc, np.ones(2), np.ones(2), k=bad_k)
        with pytest.raises(ValueError, match="recall_k"):
            ranking_metrics(qid, doc, np.ones(2), np.ones(2), recall_k=bad_k)
    # an unjudged row of an evaluated query is ranked: its score must be a number
    with pytest.raises(ValueError, match="NaN"):
        ranking_metrics(qid, doc, np.array([1.0, np.nan]), np.array([1.0, np.nan]))
    with pytest.raises(TypeError, match="Judgements"):
        ranking_metrics(qid, doc, np.ones(2), np.ones(2), judgements={("q", "a"): 1})


def test_to_dict_is_json_safe_builtin_types() -> None:
    m = RankingMetrics(float("nan"), float("inf"), np.float64(2.0), np.int64(3), 1, 0, 2, 0)
    d = m.to_dict()
    assert d["mrr_at_10"] is None and d["ndcg_at_10"] is None
    assert type(d["pnr"]) is float and type(d["pairs_correct"]) is int
    assert d["ndcg_gain"] == RankingMetrics.NDCG_GAIN and "2**relevance - 1" in d["ndcg_gain"]
    assert d["judged_by"] == "labels" and d["recall"] is None and d["ndcg_at_10_linear"] is None
    json.dumps(d, allow_nan=False)


# --------------------------------------------------------------------------- random data

QIDS = ["q0", "q1", "q2", "q10", "Q", "é"]
SCORES = [-np.inf, -1.0, -0.0, 0.0, 0.5, 1.0, 2.0, np.inf]
LABELS = [0.0, 0.0, 1.0, 2.0, 3.0, 0.5, np.nan]

row = st.tuples(
    st.sampled_from(QIDS),
    st.text(alphabet="ab1Zé", max_size=3),
    st.one_of(
        st.sampled_from(LABELS),
        st.floats(0, 4, allow_nan=False).map(lambda x: round(x, 3)),
    ),
    st.one_of(st.sampled_from(SCORES), st.floats(-5, 5, allow_nan=False)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(row, max_size=40), st.booleans())
def test_rank_matches_reference(rows: list[tuple], unicode_dtype: bool) -> None:
    qid = [r[0] for r in rows]
    doc = [r[1] for r in rows]
    score = [r[3] for r in rows]
    dtype = np.str_ if unicode_dtype else object
    order, rank = rank_per_query(
        np.array(qid, dtype=dtype), np.array(doc, dtype=dtype), np.array(score)
    )
    want_order, want_rank = ref_rank(qid, doc, score)
    assert order.tolist() == want_order
    assert rank.tolist() == want_rank


@pytest.mark.parametrize("max_labels_for_cumsum", [0, pairs._MAX_LABELS_FOR_CUMSUM])
@settings(max_examples=300, deadline=None)
@given(rows=st.lists(row, max_size=40), k=st.integers(1, 12))
def test_metrics_match_reference(rows: list[tuple], k: int, max_labels_for_cumsum: int) -> None:
    """Both PNR strategies (merge count, per-label cumulative count) against brute force."""
    qid, doc, label, score = (list(col) for col in zip(*rows)) if rows else ([], [], [], [])
    with mock.patch.object(pairs, "_MAX_LABELS_FOR_CUMSUM", max_labels_for_cumsum):
        got = ranking_metrics(*arrays(qid, doc, label, score), k=k, recall_k=k + 1)
    assert_metrics_equal(got, ref_metrics(qid, doc, label, score, k=k, recall_k=k + 1))


QREL_VALUES = [None, None, -1.0, 0.0, 1.0, 2.0, 3.0, 0.5]
extra_qrel = st.tuples(st.sampled_from(QIDS + ["q9"]), st.text(alphabet="ab1Zé", max_size=3),
                       st.sampled_from(QREL_VALUES[2:]))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), rows=st.lists(row, max_size=40), k=st.integers(1, 12),
       recall_k=st.one_of(st.none(), st.integers(1, 12)), extra=st.lists(extra_qrel, max_size=15))
def test_metrics_with_qrels_match_reference(data, rows: list[tuple], k: int, recall_k, extra) -> None:
    """Qrels judging some candidates (negative grades too), and pairs that are not candidates."""
    qid, doc, label, score = (list(col) for col in zip(*rows)) if rows else ([], [], [], [])
    judge = data.draw(st.lists(st.sampled_from(QREL_VALUES), min_size=len(rows), max_size=len(rows)))
    qrels: dict[tuple[str, str], float] = {}
    for q, d, r in [(q, d, r) for q, d, r in zip(qid, doc, judge) if r is not None] + extra:
        qrels.setdefault((q, d), r)
    j = Judgements.from_arrays(*arrays([q for q, _ in qrels], [d for _, d in qrels]), list(qrels.values()))
    got = ranking_metrics(*arrays(qid, doc, label, score), k=k, judgements=j, recall_k=recall_k)
    assert_metrics_equal(got, ref_metrics(qid, doc, label, score, k=k, qrels=qrels, recall_k=recall_k))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 300), max_size=300))
def test_count_ascending_pairs_matches_brute_force(keys: list[int]) -> None:
    want = sum(
        1 for i in range(len(keys)) for j in range(i + 1, len(keys)) if keys[i] < keys[j]
    )
    assert pairs._count_ascending_pairs(np.array(keys, dtype=np.int64)) == want


# --------------------------------------------------------------------------- scale


def searchsorted_pair_counts(label: np.ndarray, score: np.ndarray) -> tuple[int, int, int]:
    """Second, independent pair counter for one big query: per pair of label values."""
    values = np.unique(label)
    sorted_scores = {v: np.sort(score[label == v]) for v in values}
    correct = wrong = tied = 0
    for a in values:
        for b in values[values < a]:
            hi, lo = sorted_scores[a], sorted_scores[b]
            below = np.searchsorted(lo, hi, side="left").sum()
            not_above = np.searchsorted(lo, hi, side="right").sum()
            correct += int(below)
            tied += int(not_above - below)
            wrong += int(len(hi) * len(lo) - not_above)
    return correct, wrong, tied


@pytest.mark.parametrize("fractional", [False, True])
def test_single_query_with_100k_candidates(fractional: bool) -> None:
    """Graded labels use the per-label count, ~50 distinct fractional labels the merge count."""
    rng = np.random.default_rng(0)
    n = 100_000
    label = rng.integers(0, 5, n).astype(np.float64)
    if fractional:
        label = np.round(label + rng.random(n), 1)  # ~50 distinct values
    score = np.round(label + rng.normal(0, 2, n), 1)  # correlated, with many ties
    qid = np.full(n, "q", dtype=object)
    doc = np.array([f"d{i}" for i in range(n)], dtype=object)
    m = ranking_metrics(qid, doc, label, score)
    assert (m.pairs_correct, m.pairs_wrong, m.pairs_tied) == searchsorted_pair_counts(label, score)
    assert m.pairs_tied > 0 and m.pnr > 1
    order, rank = rank_per_query(qid, doc, score)
    assert np.array_equal(np.sort(rank), np.arange(1, n + 1))
    s = score[order]
    assert np.all(s[:-1] >= s[1:])
    tie = s[:-1] == s[1:]
    assert np.all(doc[order][:-1][tie] > doc[order][1:][tie])


def test_many_queries_scale() -> None:
    """200k rows over 4k queries in random order: checks invariants, not against a reference."""
    rng = np.random.default_rng(1)
    n, n_q = 200_000, 4_000
    q_int = rng.integers(0, n_q, n)
    qid = np.array([f"q{i}" for i in q_int], dtype=object)
    doc = np.array([f"d{i}" for i in rng.integers(0, 10**6, n)], dtype=object)
    label = rng.integers(0, 3, n).astype(np.float64)
    score = rng.random(n)
    order, rank = rank_per_query(qid, doc, score)
    # queries are contiguous in `order`, in order of first appearance
    seq = q_int[order]
    run_heads = seq[np.concatenate(([True], seq[1:] != seq[:-1]))]
    _, first = np.unique(q_int, return_index=True)
    assert np.array_equal(run_heads, q_int[np.sort(first)])
    # ranks are 1..size within every query
    sizes = np.bincount(q_int)
    assert np.array_equal(np.bincount(q_int, weights=rank), sizes * (sizes + 1) / 2)
    assert np.array_equal(np.bincount(q_int[rank == 1], minlength=n_q), np.ones(n_q))
    m = ranking_metrics(qid, doc, label, score)
    assert m.queries == n_q
    assert m.pairs_correct + m.pairs_wrong + m.pairs_tied > 0
    assert 0.8 < m.pnr < 1.25  # random scores: about as many right as wrong


@pytest.mark.parametrize("with_qrels", [False, True])
def test_combine_metrics_equals_metrics_of_the_union(with_qrels: bool) -> None:
    rng = np.random.default_rng(3)
    n = 3000
    qid = np.array([f"q{i}" for i in rng.integers(0, 150, n)], dtype=object)
    doc = np.array([f"d{i}" for i in range(n)], dtype=object)
    label = rng.integers(0, 3, n).astype(float)
    label[rng.random(n) < 0.3] = 0  # more queries without a relevant doc
    label[rng.random(n) < 0.1] = np.nan  # unjudged rows
    label[np.isin(qid, ["q3", "q11"])] = 0  # queries without a relevant judgement
    label[qid == "q7"] = np.nan  # a query without judgements
    score = np.round(rng.random(n), 2)  # ties
    judgements = None
    if with_qrels:  # the judged rows, minus some, plus relevant docs that are not candidates
        judged = ~np.isnan(label) & (rng.random(n) < 0.9)
        extra_q = np.array([f"q{i}" for i in rng.integers(0, 200, 300)], dtype=object)  # q150+: no rows
        extra_q[np.isin(extra_q, ["q3", "q11", "q7"])] = "q199"
        extra_d = np.array([f"x{i}" for i in range(300)], dtype=object)
        judgements = Judgements.from_arrays(np.concatenate([qid[judged], extra_q]),
                                            np.concatenate([doc[judged], extra_d]),
                                            np.concatenate([label[judged], rng.integers(-1, 3, 300)]))
    whole = ranking_metrics(qid, doc, label, score, judgements=judgements, recall_k=20)
    bucket = np.array([int(q[1:]) % 4 for q in qid])
    parts = [ranking_metrics(qid[bucket == b], doc[bucket == b], label[bucket == b], score[bucket == b],
                             judgements=judgements, recall_k=20) for b in range(4)]
    combined = combine_metrics(parts)
    assert whole.unjudged_rows > 0 and whole.queries_without_judgements >= 1 and whole.queries_without_relevant > 0
    if with_qrels:
        assert whole.relevant_missing > 0 and whole.qrels_queries_without_candidates > 0
        assert whole.qrels_queries_without_candidates == judgements.queries_missing(qid)
    want, got = whole.to_dict(), combined.to_dict()
    assert want.keys() == got.keys()
    for key, w in want.items():
        g = got[key]
        if isinstance(w, float):
            assert abs(g - w) < 1e-12, key
        else:
            assert g == w, key


def test_combine_metrics_refuses_mixed_parts_and_keeps_empty_parts_counts() -> None:
    a = ranking_metrics(*arrays(["q"], ["d"], [1], [0.5]), recall_k=5)
    b = ranking_metrics(*arrays(["r"], ["d"], [np.nan], [np.nan]), recall_k=5)  # no evaluated query
    c = combine_metrics([a, b])
    assert (c.queries, c.queries_without_judgements, c.mrr_at_10, c.recall) == (1, 1, 1.0, 1.0)
    for other in (ranking_metrics(*arrays(["q"], ["d"], [1], [0.5])),  # recall not asked
                  ranking_metrics(*arrays(["q"], ["d"], [1], [0.5]), k=5, recall_k=5)):
        with pytest.raises(ValueError, match="combine"):
            combine_metrics([a, other])
    assert combine_metrics([]).queries == 0


# --------------------------------------------------------------------------- Judgements


def test_judgements_lookups() -> None:
    j = Judgements.from_arrays(np.array(["q1", "q1", "q2", "q1", "é"]), np.array(["a", "b", "a", "c", "中"]),
                               np.array([2, 0, -1, 1, 3]))
    assert (len(j), j.n_queries, j.qids.tolist()) == (5, 3, ["q1", "q2", "é"])
    rel = j.relevance(*arrays(["q1", "q2", "q2", "é", "x"], ["b", "a", "b", "中", "a"]))
    assert rel[:2].tolist() == [0.0, -1.0] and np.isnan(rel[2]) and rel[3] == 3 and np.isnan(rel[4])
    assert j.query_index(np.array(["é", "q3", "q1"])).tolist() == [2, -1, 0]
    assert j.relevant_counts(np.array([0, 1, 2])).tolist() == [2, 0, 1]
    which, position, relevance = j.top_judgements(np.array([2, 0]), k=2)
    assert (which.tolist(), position.tolist(), relevance.tolist()) == ([0, 1, 1], [1, 1, 2], [3.0, 2.0, 1.0])
    assert j.queries_missing(["q1", "zz"]) == 2 and j.queries_missing(np.array(["q1", "q2", "é"])) == 0
    assert "5 judgements" in repr(j)
    assert j.summary() == {"layout": None, "judgements": 5, "queries": 3, "relevant_judgements": 3,
                           "queries_without_relevant": 1}
    json.dumps(j.summary())
    again = pickle.loads(pickle.dumps(j))
    assert np.array_equal(again.relevance(*arrays(["q1"], ["a"])), [2.0])
    empty = Judgements.from_arrays(np.array([], dtype=object), np.array([], dtype=object), np.array([]))
    assert empty.n_queries == 0 and np.isnan(empty.relevance(*arrays(["q"], ["d"]))).all()


def test_judgements_refuse_duplicates_and_bad_relevance() -> None:
    with pytest.raises(DuplicateJudgement, match="'q1'.*'b'.*rows 1 and 3") as e:
        Judgements.from_arrays(*arrays(["q1", "q1", "q2", "q1"], ["a", "b", "a", "b"]), [1, 2, 3, 4])
    assert isinstance(e.value, ValueError) and (e.value.first, e.value.second) == (1, 3)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="finite"):
            Judgements.from_arrays(*arrays(["q"], ["a"]), [bad])
    with pytest.raises(TypeError):
        Judgements.from_arrays(np.array([1]), np.array(["a"]), [1])
    with pytest.raises(ValueError, match="same length"):
        Judgements.from_arrays(*arrays(["q"], ["a"]), [1, 2])


@pytest.mark.parametrize("collide", ["all", "some"])
def test_judgements_survive_hash_collisions(monkeypatch: pytest.MonkeyPatch, collide: str) -> None:
    """"all": every key equal (the exact dict takes over); "some": a row's key equals the key of
    a different judged pair (caught by comparing the strings)."""
    if collide == "all":
        fake = lambda cols: np.zeros(len(cols[0]), dtype=np.int64)  # noqa: E731
    else:
        fake = lambda cols: np.array([len(str(x)) for x in cols[0].tolist()], dtype=np.int64)  # noqa: E731
    monkeypatch.setattr(judgements_module, "_hashes", fake)
    if collide == "all":
        with pytest.raises(DuplicateJudgement, match="rows 0 and 2"):
            Judgements.from_arrays(*arrays(["q", "r", "q"], ["a", "a", "a"]), [1, 2, 3])
    j = Judgements.from_arrays(*arrays(["q", "rr"], ["a", "b"]), [1, 2])
    rel = j.relevance(*arrays(["x", "q", "rr", "ss"], ["a", "a", "b", "b"]))
    assert np.isnan(rel[0]) and rel[1:3].tolist() == [1.0, 2.0] and np.isnan(rel[3])
    assert j.query_index(np.array(["rr", "x", "q"])).tolist() == [1, -1, 0]
