"""Tests for pipeline.ranking (order, pairs, metrics) against brute-force references written with
plain Python loops.

The references enumerate every pair and compute every DCG term explicitly, deliberately sharing
no code or trick (hashing, lexsort, inversion counting) with the vectorised implementation.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ranking import order as order_module
from pipeline.ranking import pairs
from pipeline.ranking import RankingMetrics, rank_per_query, ranking_metrics

TOL = 1e-12


# --------------------------------------------------------------------------- references


def ref_rank(qid: list[str], doc: list[str], score: list[float]) -> tuple[list[int], list[int]]:
    groups: dict[str, list[int]] = {}  # dicts keep insertion order = first appearance
    for i, q in enumerate(qid):
        groups.setdefault(q, []).append(i)
    order: list[int] = []
    rank = [0] * len(qid)
    for rows in groups.values():
        ranked = sorted(rows, key=lambda i: (-score[i], doc[i], i))
        for r, i in enumerate(ranked, start=1):
            rank[i] = r
        order.extend(ranked)
    return order, rank


def ref_metrics(
    qid: list[str], doc: list[str], label: list[float], score: list[float], k: int = 10
) -> dict:
    keep = [i for i in range(len(qid)) if not math.isnan(label[i])]
    q = [qid[i] for i in keep]
    d = [doc[i] for i in keep]
    lab = [label[i] + 0.0 for i in keep]
    sc = [score[i] for i in keep]
    order, _ = ref_rank(q, d, sc)
    per_query: dict[str, list[int]] = defaultdict(list)
    for i in order:  # rows of a query, in ranked order
        per_query[q[i]].append(i)

    rr_sum = 0.0
    ndcgs: list[float] = []
    without_relevant = 0
    correct = wrong = tied = 0
    for rows in per_query.values():
        labels = [lab[i] for i in rows]
        rr = 0.0
        for pos, x in enumerate(labels[:k]):
            if x > 0:
                rr = 1.0 / (pos + 1)
                break
        rr_sum += rr
        dcg = sum((2.0**x - 1) / math.log2(pos + 2) for pos, x in enumerate(labels[:k]))
        ideal_labels = sorted(labels, reverse=True)[:k]
        idcg = sum((2.0**x - 1) / math.log2(pos + 2) for pos, x in enumerate(ideal_labels))
        if any(x > 0 for x in labels):
            ndcgs.append(dcg / idcg)
        else:
            without_relevant += 1
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                i, j = rows[a], rows[b]
                if lab[i] == lab[j]:
                    continue
                hi, lo = (i, j) if lab[i] > lab[j] else (j, i)
                if sc[hi] > sc[lo]:
                    correct += 1
                elif sc[hi] < sc[lo]:
                    wrong += 1
                else:
                    tied += 1
    n_q = len(per_query)
    return {
        "mrr_at_10": rr_sum / n_q if n_q else None,
        "ndcg_at_10": sum(ndcgs) / len(ndcgs) if ndcgs else None,
        "pnr": correct / wrong if wrong else None,
        "pairs_correct": correct,
        "pairs_wrong": wrong,
        "pairs_tied": tied,
        "queries": n_q,
        "queries_without_relevant": without_relevant,
        "k": k,
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
    # b first (first seen), then a, then c; ties by doc_id; rank aligned with input rows
    assert order.tolist() == [5, 2, 0, 3, 1, 4]
    assert rank.tolist() == [3, 2, 2, 1, 1, 1]
    assert order.dtype == np.int64 and rank.dtype == np.int64


def test_rank_doc_id_compares_as_string_and_accepts_unicode_dtype() -> None:
    qid = np.array(["q"] * 4)  # unicode dtype
    doc = np.array(["9", "10", "1", "é"])
    order, rank = rank_per_query(qid, doc, np.zeros(4))
    assert order.tolist() == [2, 1, 0, 3]  # "1" < "10" < "9" < "é"
    assert rank.tolist() == [3, 2, 1, 4]


def test_rank_negative_zero_ties_with_zero_and_inf_allowed() -> None:
    qid, doc = arrays(["q"] * 4, ["b", "a", "c", "d"])
    order, _ = rank_per_query(qid, doc, np.array([0.0, -0.0, np.inf, -np.inf]))
    assert order.tolist() == [2, 1, 0, 3]


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
    # q1: a(.9, 0) b(.8, 2) c(.7, 1)  -> first relevant at rank 2; pairs: (b,a) wrong,
    #     (c,a) wrong, (b,c) correct
    # q2: d(.5, 0) e(.5, 0)            -> no relevant doc, no pairs
    # q3: f(.1, 1)                     -> relevant at rank 1, NDCG 1
    # g: NaN label -> ignored, even with a NaN score
    qid = ["q1", "q2", "q1", "q3", "q1", "q2", "q1"]
    doc = ["a", "d", "b", "f", "c", "e", "g"]
    label = [0, 0, 2, 1, 1, 0, np.nan]
    score = [0.9, 0.5, 0.8, 0.1, 0.7, 0.5, np.nan]
    m = ranking_metrics(*arrays(qid, doc, label, score))
    ndcg_q1 = (3 / math.log2(3) + 1 / 2) / (3 + 1 / math.log2(3))
    assert math.isclose(ndcg_q1, 0.6590018, rel_tol=1e-6)
    assert math.isclose(m.mrr_at_10, (1 / 2 + 0 + 1) / 3, rel_tol=TOL)
    assert math.isclose(m.ndcg_at_10, (ndcg_q1 + 1) / 2, rel_tol=TOL)
    assert (m.pairs_correct, m.pairs_wrong, m.pairs_tied) == (1, 2, 0)
    assert m.pnr == 0.5
    assert (m.queries, m.queries_without_relevant, m.k) == (3, 1, 10)


def test_metrics_hand_case_ties_and_cutoff() -> None:
    # one query, k=2. Ranked: x(3, 0) then y(1, 0) and z(1, 1) tie on score -> doc_id puts y
    # before z, so the relevant doc is at rank 3 > k: RR 0 and DCG@2 0. Pairs: (z,x) wrong,
    # (z,y) tied.
    qid, doc, label, score = arrays(["q"] * 3, ["x", "z", "y"], [0, 1, 0], [3, 1, 1])
    m = ranking_metrics(qid, doc, label, score, k=2)
    assert m.mrr_at_10 == 0.0 and m.ndcg_at_10 == 0.0
    assert (m.pairs_correct, m.pairs_wrong, m.pairs_tied) == (0, 1, 1)
    assert m.pnr == 0.0
    assert m.to_dict()["k"] == 2


def test_metrics_no_wrong_pairs_and_no_relevant_gives_none() -> None:
    qid, doc, label, score = arrays(["q", "q"], ["a", "b"], [0, 0], [1, 2])
    m = ranking_metrics(qid, doc, label, score)
    assert m.pnr is None and m.ndcg_at_10 is None and m.mrr_at_10 == 0.0
    assert m.queries_without_relevant == 1
    d = m.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["pnr"] is None and d["ndcg_at_10"] is None


def test_metrics_empty_and_all_unlabeled() -> None:
    for label in ([], [np.nan, np.nan]):
        n = len(label)
        m = ranking_metrics(*arrays(["q"] * n, ["d"] * n, label, [np.nan] * n))
        assert m.queries == 0 and m.mrr_at_10 is None and m.ndcg_at_10 is None
        json.dumps(m.to_dict(), allow_nan=False)


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


def test_to_dict_is_json_safe_builtin_types() -> None:
    m = RankingMetrics(float("nan"), float("inf"), np.float64(2.0), np.int64(3), 1, 0, 2, 0)
    d = m.to_dict()
    assert d["mrr_at_10"] is None and d["ndcg_at_10"] is None
    assert type(d["pnr"]) is float and type(d["pairs_correct"]) is int
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
        got = ranking_metrics(*arrays(qid, doc, label, score), k=k)
    assert_metrics_equal(got, ref_metrics(qid, doc, label, score, k=k))


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
    assert np.all(doc[order][:-1][tie] < doc[order][1:][tie])


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


def test_combine_metrics_equals_metrics_of_the_union() -> None:
    from pipeline.ranking import combine_metrics

    rng = np.random.default_rng(3)
    n = 3000
    qid = np.array([f"q{i}" for i in rng.integers(0, 150, n)], dtype=object)
    doc = np.array([f"d{i}" for i in range(n)], dtype=object)
    label = rng.integers(0, 3, n).astype(float)
    label[rng.random(n) < 0.3] = 0  # more queries without a relevant doc
    score = np.round(rng.random(n), 2)  # ties
    whole = ranking_metrics(qid, doc, label, score)
    bucket = np.array([int(q[1:]) % 4 for q in qid])
    parts = [ranking_metrics(qid[bucket == b], doc[bucket == b], label[bucket == b], score[bucket == b])
             for b in range(4)]
    combined = combine_metrics(parts)
    for field in ("pairs_correct", "pairs_wrong", "pairs_tied", "queries", "queries_without_relevant"):
        assert getattr(combined, field) == getattr(whole, field)
    for field in ("mrr_at_10", "ndcg_at_10", "pnr"):
        assert abs(getattr(combined, field) - getattr(whole, field)) < 1e-12
