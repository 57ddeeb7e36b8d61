"""pipeline.ranking's metrics against trec_eval, through `pytrec_eval` and `ir-measures`
(requirements-test.txt), on generated runs: graded labels 0-3, tied scores, unjudged documents,
queries without a relevant document, non-ASCII ids, and with qrels also relevant documents that
are not candidates, negative grades, queries only in the qrels and queries only in the run.

What each reference computes, and how the comparisons line up with our semantics
(pipeline.ranking.metrics):

* trec_eval (pytrec_eval; nDCG@k and R@k in ir-measures) orders tied scores by doc_id
  DEscending, and so do we (pipeline.ranking.order), so trec_eval gets the RAW tied scores. It
  also gets a tie-free run whose scores follow the order an independent Python sort gives,
  (-score, doc_id descending) per query. ir-measures' RR@10 comes from its msmarco provider,
  which breaks ties the other way (doc_id ascending): it gets the tie-free run only.
* trec_eval averages over the queries of both the run and the qrels, as we do; ir-measures'
  calc_aggregate averages over all the qrels' queries, a query without candidates counting 0:
  its means times the qrels' query count equal ours times our query count.
* nDCG in trec_eval uses the linear gain (our ndcg_at_10_linear); our exponential ndcg_at_10 is
  trec_eval's nDCG on qrels whose grades g were replaced by 2**g - 1 (the same numbers for integer
  grades).

Tolerance: 1e-9, absolute. Each comparison is also run on a deliberately wrong variant (the
other tie order, a list condensed to the judged documents, an ideal built from the candidates
only) to show the data is able to tell them apart.
"""

from __future__ import annotations

import ir_measures
import numpy as np
import pytest
import pytrec_eval
from ir_measures import RR, R, nDCG

from pipeline.ranking import Judgements, RankingMetrics, combine_metrics, ranking_metrics

TOL = 1e-9
K, RECALL_K = 10, 100
# ids whose code-point order differs from their order in ASCII-folded or locale-aware sorting
ID_CHARS = ["d", "D", "é", "e", "中", "ß", "z", "ä", "😀", "ñ"]


# --------------------------------------------------------------------------- generated data


def generate(seed: int, n_queries: int = 300):
    """Rows (qid, doc_id, label, score) of a run; label NaN = unjudged."""
    rng = np.random.default_rng(seed)
    qid, doc, label, score = [], [], [], []
    for q in range(n_queries):
        name = f"q{q}" if q % 7 else f"qé{q}"
        size = int(rng.choice([1, 1, 2, 3, 8, 30, 150]))
        ids = [f"{ID_CHARS[i % len(ID_CHARS)]}{i // len(ID_CHARS)}" for i in rng.choice(400, size, replace=False)]
        grades = rng.choice([0, 0, 0, 1, 2, 3], size).astype(float)
        kind = q % 10
        if kind == 1:
            grades[:] = 0  # judged, but nothing relevant
        elif kind == 2:
            grades[:] = np.nan  # no judgement at all
        else:
            grades[rng.random(size) < 0.25] = np.nan  # unjudged candidates
        s = rng.integers(0, 4, size) / 4 if q % 3 else np.round(rng.normal(size=size), 1)  # ties
        qid += [name] * size
        doc += ids
        label += grades.tolist()
        score += s.tolist()
    return (np.array(qid, dtype=object), np.array(doc, dtype=object), np.array(label), np.array(score))


def qrels_of_labels(qid, doc, label) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for q, d, x in zip(qid, doc, label):
        if not np.isnan(x):
            qrels.setdefault(q, {})[d] = int(x)
    return qrels


def generate_qrels(seed: int, qid, doc, label) -> dict[str, dict[str, int]]:
    """Most judged rows; relevant docs that are not candidates; some -1 grades; queries only in
    the qrels; run queries left out of the qrels."""
    rng = np.random.default_rng(seed + 1000)
    qrels: dict[str, dict[str, int]] = {}
    for q, d, x in zip(qid, doc, label):
        if not np.isnan(x) and rng.random() < 0.85:
            qrels.setdefault(q, {})[d] = -1 if x == 0 and rng.random() < 0.1 else int(x)
    for q in sorted(set(qid.tolist())):
        if q in qrels and rng.random() < 0.05:
            del qrels[q]  # a run query the qrels do not know
        elif q in qrels and rng.random() < 0.4:
            for i in range(int(rng.integers(1, 4))):
                qrels[q][f"missing{i}é"] = int(rng.integers(1, 4))  # relevant, not a candidate
    for i in range(20):
        qrels[f"qrels-only{i}"] = {"x": int(rng.integers(0, 4)), "中": 1}
    return qrels


def judgements_of(qrels: dict[str, dict[str, int]]) -> Judgements:
    pairs = [(q, d, r) for q, docs in qrels.items() for d, r in docs.items()]
    return Judgements.from_arrays(np.array([p[0] for p in pairs], dtype=object),
                                  np.array([p[1] for p in pairs], dtype=object), np.array([p[2] for p in pairs]))


# --------------------------------------------------------------------------- reference runs


def sorted_run(qid, doc, score, descending_ties: bool = True) -> dict[str, list[str]]:
    """Per query, doc ids by (-score, doc_id descending) with Python's sort (code-point order:
    trec_eval's order and ours), or with the ties the other way round."""
    per_query: dict[str, list[tuple[float, str]]] = {}
    for q, d, s in zip(qid.tolist(), doc.tolist(), score.tolist()):
        per_query.setdefault(q, []).append((s, d))
    out = {}
    for q, items in per_query.items():
        items.sort(key=lambda t: t[1], reverse=descending_ties)
        items.sort(key=lambda t: -t[0])  # stable: ties keep the doc_id order
        out[q] = [d for _, d in items]
    return out


def tie_free(ranking: dict[str, list[str]], keep=lambda q, d: True) -> dict[str, dict[str, float]]:
    """A run whose distinct scores make trec_eval reproduce `ranking` (optionally filtered)."""
    return {q: {d: float(len(docs) - i) for i, d in enumerate(docs) if keep(q, d)} for q, docs in ranking.items()}


def raw_run(qid, doc, score) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for q, d, s in zip(qid.tolist(), doc.tolist(), score.tolist()):
        run.setdefault(q, {})[d] = s
    return run


def exponential(qrels: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {q: {d: 2**r - 1 if r > 0 else r for d, r in docs.items()} for q, docs in qrels.items()}


def pytrec(qrels, run) -> dict[str, float]:
    """trec_eval's means over the queries of both run and qrels, RR@10 from the run cut at 10
    (in trec_eval's order: score descending, ties by doc_id descending)."""
    top = {q: dict(sorted(sorted(docs.items(), reverse=True), key=lambda t: -t[1])[:K]) for q, docs in run.items()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{K}", f"recall.{RECALL_K}"}).evaluate(run)
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top)
    assert rr.keys() == per_query.keys()
    return {"queries": len(per_query),
            "ndcg": float(np.mean([v[f"ndcg_cut_{K}"] for v in per_query.values()])),
            "recall": float(np.mean([v[f"recall_{RECALL_K}"] for v in per_query.values()])),
            "rr": float(np.mean([v["recip_rank"] for v in rr.values()]))}


def measures(qrels, run) -> dict:
    return ir_measures.calc_aggregate([nDCG @ K, RR @ K, R @ RECALL_K], qrels, run)


def ours(qid, doc, label, score, judgements=None, buckets: int = 1) -> RankingMetrics:
    if buckets == 1:
        return ranking_metrics(qid, doc, label, score, K, judgements=judgements, recall_k=RECALL_K)
    names = sorted(set(qid.tolist()))
    bucket = np.array([names.index(q) % buckets for q in qid.tolist()])  # whole queries per bucket
    return combine_metrics([ranking_metrics(qid[bucket == b], doc[bucket == b], label[bucket == b],
                                            score[bucket == b], K, judgements=judgements, recall_k=RECALL_K)
                            for b in range(buckets)])


def close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL


# --------------------------------------------------------------------------- the comparisons


def check_against_trec_eval(m: RankingMetrics, qrels, qid, doc, score) -> None:
    raw = raw_run(qid, doc, score)  # tied scores as they are: trec_eval breaks the ties as we do
    run = tie_free(sorted_run(qid, doc, score))
    for reference_run in (raw, run):
        ref = pytrec(qrels, reference_run)
        assert m.queries == ref["queries"]
        assert close(m.ndcg_at_10_linear, ref["ndcg"]), (m.ndcg_at_10_linear, ref["ndcg"])
        assert close(m.mrr_at_10, ref["rr"]), (m.mrr_at_10, ref["rr"])
        assert close(m.recall, ref["recall"]), (m.recall, ref["recall"])
        assert close(m.ndcg_at_10, pytrec(exponential(qrels), reference_run)["ndcg"])

    # ir-measures: means over all qrels queries (a query without candidates counts 0)
    scale = m.queries / len(qrels)
    agg = measures(qrels, raw)
    assert close(m.ndcg_at_10_linear * scale, agg[nDCG @ K])
    assert close(m.recall * scale, agg[R @ RECALL_K])
    assert close(m.ndcg_at_10 * scale, measures(exponential(qrels), raw)[nDCG @ K])
    # RR@10 from ir-measures' msmarco provider, which breaks ties the other way: the tie-free run
    assert close(m.mrr_at_10 * scale, measures(qrels, run)[RR @ K])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_equal_trec_eval(seed: int) -> None:
    qid, doc, label, score = generate(seed)
    qrels = qrels_of_labels(qid, doc, label)  # trec_eval's view of the rows' labels
    m = ours(qid, doc, label, score)
    assert m.unjudged_rows > 0 and m.queries_without_relevant > 0 and m.queries_without_judgements > 0
    assert m.queries == len(qrels)
    check_against_trec_eval(m, qrels, qid, doc, score)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qrels_equal_trec_eval(seed: int) -> None:
    qid, doc, label, score = generate(seed)
    qrels = generate_qrels(seed, qid, doc, label)
    m = ours(qid, doc, np.full(len(qid), np.nan), score, judgements=judgements_of(qrels))  # labels ignored
    assert m.relevant_missing > 0 and m.unjudged_rows > 0 and m.queries_without_judgements > 0
    assert m.qrels_queries == len(qrels) and m.qrels_queries_without_candidates == 20
    check_against_trec_eval(m, qrels, qid, doc, score)


@pytest.mark.parametrize("with_qrels", [False, True])
def test_buckets_equal_trec_eval(with_qrels: bool) -> None:
    qid, doc, label, score = generate(5)
    qrels = generate_qrels(5, qid, doc, label) if with_qrels else qrels_of_labels(qid, doc, label)
    judgements = judgements_of(qrels) if with_qrels else None
    m = ours(qid, doc, label, score, judgements, buckets=7)
    check_against_trec_eval(m, qrels, qid, doc, score)
    whole = ours(qid, doc, label, score, judgements)
    assert m.to_dict().keys() == whole.to_dict().keys()
    for key, value in whole.to_dict().items():
        assert close(m.to_dict()[key], value) if isinstance(value, float) else m.to_dict()[key] == value, key


@pytest.mark.parametrize("with_qrels", [False, True])
def test_the_data_tells_wrong_variants_apart(with_qrels: bool) -> None:
    """Each deliberate mistake moves the trec_eval numbers by far more than TOL, so the
    comparisons above would catch it."""
    qid, doc, label, score = generate(0)
    qrels = generate_qrels(0, qid, doc, label) if with_qrels else qrels_of_labels(qid, doc, label)
    right = pytrec(qrels, tie_free(sorted_run(qid, doc, score)))
    other_ties = pytrec(qrels, tie_free(sorted_run(qid, doc, score, descending_ties=False)))
    condensed = pytrec(qrels, tie_free(sorted_run(qid, doc, score), keep=lambda q, d: d in qrels.get(q, {})))
    for wrong in (other_ties, condensed):
        assert abs(wrong["ndcg"] - right["ndcg"]) > 1e-4 and abs(wrong["rr"] - right["rr"]) > 1e-4
    assert abs(pytrec(exponential(qrels), tie_free(sorted_run(qid, doc, score)))["ndcg"] - right["ndcg"]) > 1e-3
    if with_qrels:  # the ideal from the candidates only = qrels restricted to the candidates
        candidates = set(zip(qid.tolist(), doc.tolist()))
        seen = {q: {d: r for d, r in docs.items() if (q, d) in candidates} for q, docs in qrels.items()}
        seen = {q: docs for q, docs in seen.items() if docs}
        only_seen = pytrec(seen, tie_free(sorted_run(qid, doc, score)))
        assert only_seen["queries"] == right["queries"]
        assert abs(only_seen["ndcg"] - right["ndcg"]) > 1e-3 and abs(only_seen["recall"] - right["recall"]) > 1e-3


def test_tie_order_with_non_ascii_ids_equals_trec_eval() -> None:
    """All scores tied: the rank of the relevant doc is its place in descending code-point order
    (UTF-8 byte order, trec_eval's strcmp), as trec_eval ranks it; each doc is the relevant one
    in turn."""
    ids = ["é", "z", "a", "Z", "中", "e\u0301", "ä", "😀", "A", "10", "9", "ß"]
    assert sorted(ids) == sorted(ids, key=lambda d: d.encode("utf-8"))  # code points = UTF-8 bytes
    n = len(ids)
    for relevant in ids:
        qrels = {"q": {d: int(d == relevant) for d in ids}}
        label = np.array([float(d == relevant) for d in ids])
        m = ranking_metrics(np.array(["q"] * n, dtype=object), np.array(ids, dtype=object), label, np.ones(n),
                            k=K, recall_k=RECALL_K)
        want = 1 / (sorted(ids, reverse=True).index(relevant) + 1)
        assert close(m.mrr_at_10, want if want >= 1 / K else 0.0)
        full = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate({"q": {d: 1.0 for d in ids}})
        assert close(full["q"]["recip_rank"], want)  # trec_eval on the tied run, uncut
        check_against_trec_eval(m, qrels, np.array(["q"] * n, dtype=object), np.array(ids, dtype=object),
                                np.ones(n))


def test_trec_eval_itself_orders_tied_scores_by_doc_id_descending() -> None:
    """Our tie order is trec_eval's (a, b, c, d tied, d relevant: d first), not that of
    ir-measures' RR@k (its msmarco provider puts d last)."""
    qrels = {"q": {"a": 0, "b": 0, "c": 0, "d": 1}}
    tied = {"q": {d: 1.0 for d in "abcd"}}
    assert pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(tied)["q"]["recip_rank"] == 1.0
    m = ranking_metrics(np.array(["q"] * 4, dtype=object), np.array(list("abcd"), dtype=object),
                        np.array([0.0, 0, 0, 1]), np.ones(4))
    assert m.mrr_at_10 == 1.0
    assert measures(qrels, tied)[RR @ K] == 0.25
