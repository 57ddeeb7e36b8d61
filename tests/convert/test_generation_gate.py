"""The generation quality gate (pipeline/convert/generation_gate.py): the comparison on small
hand-made texts against sacrebleu and rouge-score called directly, the identical share, the
cached baseline and its key, the runner through the `generate` job on the tiny decoder, and the
record in model.json that DecoderModelInfo reads."""

import json
import shutil
from pathlib import Path

import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from pipeline.convert.generation_gate import (
    GateCandidate,
    GateDecoding,
    GeneratedOutputs,
    baseline_key,
    baseline_outputs,
    compare_generations,
    gate_record,
    loss_rate,
    record_gate,
    run_generation_gate,
)
from pipeline.engine.modeldir import load_model_info

REFS = [["the cat sat on the mat"], ["a dog ran far away"], ["paris is the capital of france"],
        ["red is a primary colour", "red"]]
BASE = ["the cat sat on a mat", "a dog ran away", "paris is the capital", "red"]


def independent_metrics(hyps, refs):
    """Corpus BLEU and mean ROUGE-L F1, computed here without the project's metric code."""
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    bleu = BLEU().corpus_score(hyps, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = sum(scorer.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)
    return {"bleu": bleu, "rouge_l": rouge}


def test_equal_outputs_pass_with_no_loss():
    g = compare_generations(BASE, list(BASE), REFS)
    assert g.passed and g.loss_rate == {"rouge_l": 0.0, "bleu": 0.0}
    assert g.identical_rows == 4 and g.identical_share == 1.0 and g.identical_by == "text"
    assert g.rows == g.rows_with_reference == 4


def test_a_candidate_that_differs_enough_fails_and_the_loss_rates_are_relative():
    cand = ["the cat sat", "a dog ran far away", "the capital", "blue"]
    g = compare_generations(BASE, cand, REFS)
    want_b, want_c = independent_metrics(BASE, REFS), independent_metrics(cand, REFS)
    for m in ("rouge_l", "bleu"):
        assert g.base[m] == pytest.approx(want_b[m], abs=1e-12)
        assert g.candidate[m] == pytest.approx(want_c[m], abs=1e-12)
        assert g.loss_rate[m] == pytest.approx(abs(want_b[m] - want_c[m]) / want_b[m], abs=1e-12)
    assert g.loss_rate["rouge_l"] > 0.01 and not g.passed
    assert g.identical_rows == 0


def test_the_limit_decides_and_a_gain_counts_as_a_change():
    # One row better than the base: the rule is |base - candidate| / base, so a gain of more than
    # the limit fails too (the gate asks for the same quality, not a better one by luck).
    cand = ["the cat sat on the mat", *BASE[1:]]
    g = compare_generations(BASE, cand, REFS)
    assert g.candidate["rouge_l"] > g.base["rouge_l"]
    assert not g.passed
    loose = compare_generations(BASE, cand, REFS, max_loss_rate=max(g.loss_rate.values()))
    assert loose.passed and loose.max_loss_rate == max(g.loss_rate.values())
    assert g.identical_rows == 3 and g.identical_share == 0.75


def test_identical_share_counts_tokens_when_given():
    # Same texts, one row's tokens differ (another segmentation of the same text): by tokens it
    # is not identical.
    base_tok = [[1, 2], [3], [4, 5], [6]]
    cand_tok = [[1, 2], [3], [4, 7], [6]]
    g = compare_generations(BASE, list(BASE), REFS, base_tokens=base_tok, candidate_tokens=cand_tok)
    assert g.identical_by == "tokens" and g.identical_rows == 3 and g.passed
    with pytest.raises(AssertionError):
        compare_generations(BASE, list(BASE), REFS, base_tokens=base_tok)


def test_loss_rate_arithmetic():
    assert loss_rate(0.5, 0.495) == pytest.approx(0.01)
    assert loss_rate(20.0, 20.3) == pytest.approx(0.015)
    assert loss_rate(0.0, 0.0) == 0.0 and loss_rate(0.0, 0.1) == float("inf")


def test_to_json_is_plain_json():
    g = compare_generations(["x"], ["y"], [["x"]])
    rec = json.loads(json.dumps(g.to_json()))
    assert rec["passed"] is False and set(rec["loss_rate"]) == {"rouge_l", "bleu"}


def test_cache_key_changes_with_model_data_and_settings():
    d = GateDecoding()
    key = baseline_key("m", ["d"], d)
    assert key == baseline_key("m", ["d"], GateDecoding())
    others = [baseline_key("m2", ["d"], d), baseline_key("m", ["d2"], d),
              baseline_key("m", ["d"], GateDecoding(max_new_tokens=32)),
              baseline_key("m", ["d"], GateDecoding(chat=True)),
              baseline_key("m", ["d"], GateDecoding(max_prompt_tokens=100)),
              baseline_key("m", ["d"], GateDecoding(prompt_overflow="reject"))]
    assert len({key, *others}) == 1 + len(others)


def test_baseline_is_cached_and_rebuilt_when_missing_or_settings_change(tiny_decoder_dir, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt": "x", "reference": "y"}) + "\n")
    calls = []

    def fake(files, decoding):
        calls.append(decoding)
        return GeneratedOutputs(("a",), (f"out{decoding.max_new_tokens}",), ((5, 6),), (("y",),))

    d = GateDecoding(max_new_tokens=4)
    out, cached = baseline_outputs(tiny_decoder_dir, [data], d, cache_root=tmp_path / "c", generate=fake)
    assert not cached and out.texts == ("out4",) and len(calls) == 1
    again, cached = baseline_outputs(tiny_decoder_dir, [data], d, cache_root=tmp_path / "c", generate=fake)
    assert cached and again == out and len(calls) == 1
    _, cached = baseline_outputs(tiny_decoder_dir, [data], GateDecoding(max_new_tokens=5),
                                 cache_root=tmp_path / "c", generate=fake)
    assert not cached and len(calls) == 2
    data.write_text(json.dumps({"id": "a", "prompt": "z", "reference": "y"}) + "\n")  # other data
    _, cached = baseline_outputs(tiny_decoder_dir, [data], d, cache_root=tmp_path / "c", generate=fake)
    assert not cached and len(calls) == 3
    shutil.rmtree(tmp_path / "c")
    _, cached = baseline_outputs(tiny_decoder_dir, [data], d, cache_root=tmp_path / "c", generate=fake)
    assert not cached and len(calls) == 4


def test_runner_through_the_generate_job_and_the_record(tiny_decoder_dir, tmp_path):
    data = tmp_path / "p.jsonl"
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": "the cat sat " * (i + 1)}],
             "reference": "the cat sat"} for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = GateDecoding(max_new_tokens=6)
    first = run_generation_gate(tiny_decoder_dir, GateCandidate(tiny_decoder_dir), [data], d,
                                cache_root=tmp_path / "c", threads=1)
    assert not first.baseline_cached
    assert first.base.ids == tuple(f"r{i}" for i in range(5))
    assert all(1 <= len(t) <= 6 for t in first.base.token_ids)
    # The same model against itself: identical token for token, no loss.
    g = first.result
    assert g.identical_rows == 5 and g.identical_by == "tokens" and g.passed
    second = run_generation_gate(tiny_decoder_dir, lambda files, dec: first.candidate, [data], d,
                                 cache_root=tmp_path / "c")
    assert second.baseline_cached and second.base == first.base

    model = tmp_path / "model"
    shutil.copytree(tiny_decoder_dir, model)
    record_gate(model, "pruning", gate_record(g, base_dir=tiny_decoder_dir, data=[data], decoding=d, forced=False))
    info = load_model_info(model)
    assert info.gates["pruning"]["passed"] is True and info.gates["pruning"]["forced"] is False
    assert info.gates["pruning"]["identical_rows"] == 5
    assert load_model_info(tiny_decoder_dir).gates == {}
    assert Path(model / "model.json").read_text().endswith("\n")
