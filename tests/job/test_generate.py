"""Generation runs end to end (`python -m pipeline generate`, `job.run` with the generate task)
on the tiny random decoder: outputs and their layout, accounting (read = generated + rejected),
prompt overflow, batch independence of a row's output (greedy and beam), sampling keyed by the
row, re-ranking with a scoring model, resume after SIGKILL, and refusals at start-up."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import REPO_ROOT, ConfigError, GenerationOptions, RunConfig
from pipeline.engine.modeldir import load_model_info
from pipeline.job.run import run

WORDS = "the cat sat on a mat and then the dog ran far away from here to there".split()


def write_prompts(path: Path, n: int, *, extra: list[str] = (), seed: int = 0) -> Path:
    """n JSONL prompts of different lengths (ids p000...), each with one reference."""
    import random

    rnd = random.Random(seed)
    lines = []
    for i in range(n):
        text = " ".join(rnd.choice(WORDS) for _ in range(1 + (i * 7) % 23))
        lines.append(json.dumps({"id": f"p{i:03d}", "prompt": text, "reference": " ".join(text.split()[:3])}))
    path.write_text("\n".join(lines + list(extra)) + "\n", encoding="utf-8")
    return path


def generations(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "generations.jsonl").read_text().splitlines())}


def cfg_for(inputs, out, **gen) -> RunConfig:
    opts = {"max_new_tokens": 8, **gen}
    return RunConfig(inputs=tuple(inputs), out_dir=out, mode="generate", workers=0, threads=1, streams=1,
                     chunk_rows=8, window_rows=16, progress=False, max_batch_size=8,
                     generation=GenerationOptions(**opts))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("gen") / "prompts.jsonl", 30)


def test_outputs_layout_accounting_and_metrics(tiny_decoder_dir, prompts, tmp_path):
    bad = [json.dumps({"id": "p001", "prompt": "dup"}),  # duplicate id
           json.dumps({"id": "e1", "prompt": "   "}),  # empty prompt
           '{"id": "broken", "prompt": ',  # malformed JSON
           json.dumps({"id": "m1", "messages": "not json"})]  # no prompt field: missing prompt
    src = write_prompts(tmp_path / "in.jsonl", 30, extra=bad)
    out = tmp_path / "out"
    info = load_model_info(tiny_decoder_dir)
    report = run(cfg_for([src], out), info)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["generations.jsonl", "predictions.tsv", "rejects.tsv", "report.html", "report.json", "submission.zip"])
    r = report["rows"]
    assert (r["read"], r["generated"], r["rejected"]) == (34, 30, 4)
    rejects = (out / "rejects.tsv").read_text().splitlines()
    assert rejects[0] == "file\tline\tid\treason"
    reasons = [line.split("\t") for line in rejects[1:]]
    assert [x[1] for x in reasons] == ["31", "32", "33", "34"]
    assert "duplicate id 'p001'" in reasons[0][3] and "first seen at" in reasons[0][3]
    assert "empty text in field 'prompt'" in reasons[1][3]
    assert "malformed JSON" in reasons[2][3]
    assert "missing field 'prompt'" in reasons[3][3]

    gens = generations(out)
    assert list(gens) == [f"p{i:03d}" for i in range(30)]  # input order
    for g in gens.values():
        (c,) = g["candidates"]
        assert c["num_tokens"] == len(c["token_ids"]) <= 8
        assert c["finish_reason"] in ("eos", "length")
        assert c["mean_logprob"] == pytest.approx(c["sum_logprob"] / c["num_tokens"])
        assert g["references"] and g["prompt_tokens"] >= 1
    pred = (out / "predictions.tsv").read_text().splitlines()
    assert pred[0] == "id\tprediction" and [p.split("\t")[0] for p in pred[1:]] == list(gens)
    t = report["tokens"]
    assert t["generated"] == sum(g["candidates"][0]["num_tokens"] for g in gens.values())
    assert t["prompt"] == sum(g["prompt_tokens"] for g in gens.values()) <= t["prefill_computed"] <= t["prompt_padded"]
    m = report["metrics"]
    assert m["rows_with_reference"] == 30 and set(m) >= {"bleu", "chrf", "rouge_l"}
    assert report["task"] == "generate" and report["model"]["checksum"] == info.checksum
    assert report["settings"]["generation"]["decoding"]["max_new_tokens"] == 8


def test_a_row_does_not_depend_on_its_batch(tiny_decoder_dir, prompts, tmp_path):
    """Each prompt generated alone (its own file, batch of one) equals the same prompt inside a
    mixed-length batch of the full run, for greedy and for beam search."""
    info = load_model_info(tiny_decoder_dir)
    rows = prompts.read_text().splitlines()
    for gen in ({}, {"num_beams": 3, "num_return_sequences": 2}):
        full = tmp_path / f"full{len(gen)}"
        run(cfg_for([prompts], full, **gen), info)
        together = generations(full)
        for k in (0, 7, 18):
            one = write_prompts(tmp_path / "one.jsonl", 0, extra=[rows[k]])
            alone = tmp_path / f"alone{k}{len(gen)}"
            run(cfg_for([one], alone, **gen), info)
            rid = json.loads(rows[k])["id"]
            a, b = generations(alone)[rid]["candidates"], together[rid]["candidates"]
            assert [c["token_ids"] for c in a] == [c["token_ids"] for c in b]
            assert [c["score"] for c in a] == pytest.approx([c["score"] for c in b], abs=1e-5)


def test_sampling_depends_on_seed_and_row_only(tiny_decoder_dir, prompts, tmp_path):
    info = load_model_info(tiny_decoder_dir)
    sample = {"do_sample": True, "top_k": 20, "temperature": 1.5, "num_return_sequences": 2}
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run(cfg_for([prompts], a, seed=7, **sample), info)
    cfg = cfg_for([prompts], b, seed=7, **sample)
    run(RunConfig(**{**cfg.__dict__, "chunk_rows": 5, "window_rows": 7}), info)  # other batches and windows
    run(cfg_for([prompts], c, seed=8, **sample), info)
    ga, gb, gc = generations(a), generations(b), generations(c)
    assert all([x["token_ids"] for x in ga[k]["candidates"]] == [x["token_ids"] for x in gb[k]["candidates"]]
               for k in ga)
    assert any([x["token_ids"] for x in ga[k]["candidates"]] != [x["token_ids"] for x in gc[k]["candidates"]]
               for k in ga)


def test_prompt_overflow_truncates_or_rejects_and_is_counted(tiny_decoder_dir, tmp_path):
    long = json.dumps({"id": "long", "prompt": "the cat " * 40})
    src = write_prompts(tmp_path / "in.jsonl", 2, extra=[long])  # 1 and 8 words: under 48 tokens
    info = load_model_info(tiny_decoder_dir)
    rep = run(cfg_for([src], tmp_path / "t", max_prompt_tokens=48), info)
    assert rep["tokens"]["prompts_truncated"] == 1 and rep["rows"]["generated"] == 3
    g = generations(tmp_path / "t")
    assert g["long"]["prompt_truncated"] is True and g["long"]["prompt_tokens"] == 48
    assert not g["p001"]["prompt_truncated"]
    rep = run(cfg_for([src], tmp_path / "r", max_prompt_tokens=48, prompt_overflow="reject"), info)
    assert (rep["rows"]["generated"], rep["rows"]["rejected"]) == (2, 1)
    assert "more than --max-prompt-tokens 48" in (tmp_path / "r" / "rejects.tsv").read_text()


def test_messages_are_rendered_with_the_chat_template(tiny_decoder_dir, tmp_path):
    """`messages` rows and `--chat` plain prompts render to the same prompt tokens."""
    info = load_model_info(tiny_decoder_dir)
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "the cat"}]}) + "\n")
    (tmp_path / "p.tsv").write_text("id\tprompt\na\tthe cat\n")
    run(cfg_for([tmp_path / "m.jsonl"], tmp_path / "m"), info)
    run(cfg_for([tmp_path / "p.tsv"], tmp_path / "p", chat=True), info)
    run(cfg_for([tmp_path / "p.tsv"], tmp_path / "raw"), info)
    m, p, raw = (generations(tmp_path / d)["a"] for d in ("m", "p", "raw"))
    assert m["candidates"] == p["candidates"] and m["prompt_tokens"] == p["prompt_tokens"] > raw["prompt_tokens"]


def test_rerank_model_records_both_scores(tiny_decoder_dir, tiny_bi_dir, prompts, tmp_path):
    info = load_model_info(tiny_decoder_dir)
    rep = run(cfg_for([prompts], tmp_path / "o", num_beams=3, num_return_sequences=3, rerank_model=tiny_bi_dir), info)
    for g in generations(tmp_path / "o").values():
        cands = g["candidates"]
        assert len(cands) == 3 and all("rerank_score" in c and "score" in c for c in cands)
        assert [c["rerank_score"] for c in cands] == sorted((c["rerank_score"] for c in cands), reverse=True)
    assert rep["seconds"]["rerank"] > 0


def test_impossible_settings_are_refused_at_startup(tiny_decoder_dir, prompts, tmp_path):
    info = load_model_info(tiny_decoder_dir)
    for gen, msg in (({"num_return_sequences": 2}, "greedy decoding returns one sequence"),
                     ({"max_prompt_tokens": 500, "max_new_tokens": 100}, "exceeds the"),
                     ({"max_cache_mb": 1, "max_prompt_tokens": 400, "num_beams": 8}, "key/value cache"),
                     ({"prompt_overflow": "drop"}, "--prompt-overflow")):
        with pytest.raises(ConfigError, match=msg):
            run(cfg_for([prompts], tmp_path / "x", **gen), info)
        assert not (tmp_path / "x" / "generations.jsonl").exists()


def test_cli_generate_and_scoring_model_mismatch(tiny_decoder_dir, tiny_cross_dir, prompts, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["generate", str(prompts), "--model", str(tiny_decoder_dir), "--out", str(out), "--max-new-tokens",
                 "4", "--threads", "1", "--workers", "0", "--no-progress", "--num-beams", "2"]) == 0
    assert "generated 30" in capsys.readouterr().out
    assert main(["generate", str(prompts), "--model", str(tiny_cross_dir), "--out", str(tmp_path / "x")]) == 2
    assert "is a scoring model" in capsys.readouterr().err


def _cmd(data, model, out, *extra):
    return [sys.executable, "-m", "pipeline", "generate", str(data), "--model", str(model), "--out", str(out),
            "--no-progress", "--chunk-rows", "4", "--window-rows", "4", "--threads", "1", "--max-new-tokens", "24",
            "--workers", "1", *extra]


def _windows(out: Path) -> int:
    try:
        return json.loads((out / ".partial" / "manifest.json").read_text())["windows"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("extra", [(), ("--num-beams", "2"), ("--do-sample", "--seed", "3")],
                         ids=["greedy", "beam", "sample"])
def test_sigkill_then_resume_is_byte_identical(tiny_decoder_dir, prompts, tmp_path, extra):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(prompts, tiny_decoder_dir, ref, *extra), cwd=REPO_ROOT, check=True, capture_output=True)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(prompts, tiny_decoder_dir, out, *extra), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _windows(out) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not (out / "generations.jsonl").exists()
    done = subprocess.run(_cmd(prompts, tiny_decoder_dir, out, *extra, "--resume"), cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("generations.jsonl", "predictions.tsv", "rejects.tsv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    report = json.loads((out / "report.json").read_text())
    assert report["sessions"] == 2 and report["rows"]["generated"] == 30
