"""The quality gate (pipeline/convert/gate.py) against values computed here independently: the
qid split from sha1 by hand, scores from the predictor on one padded batch (not through the
engine's batching and deduplication), NDCG@10 and PNR by plain per-query loops (not
pipeline.ranking). Two fp32 tiny random models stand in for "reference" and "candidate": the
same model on both sides must pass even with a zero limit, a model with other random weights
must fail, and the limit must be held against every metric with `<=`."""

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.convert import ConversionError, convert
from pipeline.convert.gate import GATE_METRICS, evaluate_gate, format_gate, held_out_mask, loss_rate, read_rows
from pipeline.engine.batching import Batch, pad_batch
from pipeline.engine.modeldir import load_model_info
from pipeline.engine.tokenizer import WordPieceTokenizer
from pipeline.io.reader import ColumnMap
from tests.conftest import write_hf_checkpoint
from tests.sample_data import sample_rows, write_tsv

# ----------------------------------------------------------------------------- references


def reference_scores(model_dir: Path, rows) -> np.ndarray:
    """One score per row as `run` defines it (cross: the model's output; bi: the dot product of
    the two unit embeddings), from the predictor on a single padded batch."""
    from pipeline.engine.predictor import PaddlePredictor, PredictorSettings

    info = load_model_info(model_dir)
    assert info.id_map_file is None, "the reference feeds WordPiece ids straight to the model"
    tok = WordPieceTokenizer(info.vocab_file, info.tokenizer)
    pred = PaddlePredictor(info, PredictorSettings(threads=1))

    def run(enc):
        batch = pad_batch(enc, Batch(np.arange(len(enc)), int(enc.lengths.max())), tok.pad_id)
        return pred.run(*batch).astype(np.float64)

    if info.task == "cross":
        return run(tok.encode_pairs(list(rows.query), list(rows.doc), info.max_seq_len))
    texts = sorted(set(rows.query) | set(rows.doc))
    emb = dict(zip(texts, run(tok.encode_single(texts, info.max_seq_len))))
    return np.array([emb[q] @ emb[d] for q, d in zip(rows.query, rows.doc)])


def reference_metrics(qid, doc_id, label, score, k: int = 10) -> dict:
    """NDCG@k (gain 2**label - 1, discount log2(rank + 1), queries without a relevant doc left
    out) and PNR (correctly / wrongly ordered pairs of same-query docs with different labels)."""
    ndcgs, correct, wrong = [], 0, 0
    for q in dict.fromkeys(qid):
        idx = [i for i in range(len(qid)) if qid[i] == q]
        ranked = sorted(idx, key=lambda i: (-score[i], doc_id[i]))
        dcg = sum((2.0 ** label[i] - 1) / math.log2(r + 2) for r, i in enumerate(ranked[:k]))
        ideal = sorted((2.0 ** label[i] - 1 for i in idx), reverse=True)[:k]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        if idcg > 0:
            ndcgs.append(dcg / idcg)
        for a in idx:
            for b in idx:
                if label[a] > label[b]:
                    correct += score[a] > score[b]
                    wrong += score[a] < score[b]
    return {"ndcg_at_10": float(np.mean(ndcgs)), "pnr": correct / wrong}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """The held-out half of the first 12 sample queries (the rows the gate of `quantize` sees)."""
    path = write_tsv(tmp_path_factory.mktemp("gate") / "calib.tsv", sample_rows(12))
    rows = read_rows([path], ColumnMap())
    return rows.take(np.flatnonzero(held_out_mask(rows.qid)))


@pytest.fixture(scope="module")
def other_bi_dir(tmp_path_factory, minilm_src) -> Path:
    """Same shape as tiny_bi_dir, other random weights (seed 1): a genuinely different model."""
    root = tmp_path_factory.mktemp("other")
    src = write_hf_checkpoint(root / "ckpt", minilm_src / "vocab.txt", num_labels=0, seed=1)
    return convert(src, root / "bi", name="tiny-bi-seed1")


def _metrics_of(model_dir, rows) -> tuple[np.ndarray, dict]:
    score = reference_scores(model_dir, rows)
    return score, reference_metrics(rows.qid, rows.doc_id, rows.label, score)


# ----------------------------------------------------------------------------- tests


def test_held_out_mask_is_the_parity_of_the_first_sha1_byte(held_out):
    qids = ["q0001", "q0002", "q0003", "q0004", "q0005", "q0006", "q0007", "q0008", "q0001"]
    want = [hashlib.sha1(q.encode("utf-8")).digest()[0] % 2 == 1 for q in qids]
    assert held_out_mask(qids).tolist() == want
    assert 0 < sum(want) < len(want)  # the sample qids fall on both sides
    assert held_out_mask(held_out.qid).all() and len(held_out) > 100 and len(set(held_out.qid)) >= 3


def test_loss_rate_is_the_relative_change_from_the_reference_either_way():
    assert loss_rate(0.5, 0.49) == pytest.approx(0.02)
    assert loss_rate(0.5, 0.51) == pytest.approx(0.02)  # two-sided: a change is a change
    assert loss_rate(0.8, 0.6) == pytest.approx(0.25)  # relative to the reference (0.2 / 0.8) ...
    assert loss_rate(0.6, 0.8) == pytest.approx(1 / 3)  # ... not to the candidate
    assert loss_rate(0.7, 0.7) == 0.0
    assert loss_rate(0.0, 0.0) == 0.0 and loss_rate(0.0, 0.1) == math.inf
    assert loss_rate(None, 0.5) is None and loss_rate(0.5, None) is None


def test_the_same_model_on_both_sides_passes_even_with_a_zero_limit(tiny_bi_dir, held_out):
    """Identical scores: every loss rate is exactly 0, so `0 <= 0` passes; a gate comparing
    with `<` or scoring the two sides differently would fail here."""
    info = load_model_info(tiny_bi_dir)
    gate = evaluate_gate(info, info, held_out, max_loss_rate=0.0, threads=1)
    assert gate.loss_rate == {m: 0.0 for m in GATE_METRICS}
    assert gate.max_abs_score_diff == 0.0 and gate.fp32 == gate.int8
    assert gate.passed is True
    assert gate.rows == len(held_out) and gate.queries == len(set(held_out.qid))
    _, want = _metrics_of(tiny_bi_dir, held_out)
    for m in GATE_METRICS:
        assert gate.fp32[m] == pytest.approx(want[m], rel=1e-9)


def test_a_different_model_fails_and_the_limit_holds_for_every_metric(tiny_bi_dir, other_bi_dir, held_out):
    ref, cand = load_model_info(tiny_bi_dir), load_model_info(other_bi_dir)
    s_ref, m_ref = _metrics_of(tiny_bi_dir, held_out)
    s_cand, m_cand = _metrics_of(other_bi_dir, held_out)
    want = {m: abs(m_ref[m] - m_cand[m]) / m_ref[m] for m in GATE_METRICS}
    # the premise: the other weights rank the held-out rows clearly differently, by different
    # amounts per metric (measured: NDCG@10 ~17%, PNR ~30%)
    assert min(want.values()) > 0.05 and max(want.values()) > 1.2 * min(want.values()), want

    gate = evaluate_gate(ref, cand, held_out, max_loss_rate=0.0, threads=1)
    assert gate.passed is False
    for m in GATE_METRICS:
        assert gate.fp32[m] == pytest.approx(m_ref[m], rel=1e-9)
        assert gate.int8[m] == pytest.approx(m_cand[m], rel=1e-9)
        assert gate.loss_rate[m] == pytest.approx(want[m], rel=1e-9)
    assert gate.max_abs_score_diff == pytest.approx(np.max(np.abs(s_ref - s_cand)), abs=1e-5)
    assert "FAILED" in format_gate(gate) and f"{100 * want['pnr']:.2f}%" in format_gate(gate)

    lo, hi = sorted(gate.loss_rate.values())
    passes = lambda limit: evaluate_gate(ref, cand, held_out, max_loss_rate=limit, threads=1).passed  # noqa: E731
    assert passes(hi) is True  # the larger loss exactly at the limit: <=
    assert passes(hi * (1 - 1e-6)) is False  # just under it
    assert passes((lo + hi) / 2) is False  # one metric within the limit is not enough
    assert "PASSED" in format_gate(evaluate_gate(ref, cand, held_out, max_loss_rate=hi, threads=1))

    # the rate is relative to the reference side: swapping the models changes the denominator
    swapped = evaluate_gate(cand, ref, held_out, max_loss_rate=1.0, threads=1)
    for m in GATE_METRICS:
        assert swapped.loss_rate[m] == pytest.approx(abs(m_ref[m] - m_cand[m]) / m_cand[m], rel=1e-9)


def test_rows_without_relevant_docs_are_refused(tiny_bi_dir, held_out):
    info = load_model_info(tiny_bi_dir)
    unlabelled = dataclasses.replace(held_out, label=np.zeros(len(held_out)))
    with pytest.raises(ConversionError, match="label"):
        evaluate_gate(info, info, unlabelled, max_loss_rate=1.0, threads=1)
