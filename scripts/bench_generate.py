"""Generated tokens/s of SmolLM2-135M (fp32, greedy): our pipeline vs the PaddleNLP baseline vs transformers.

    python scripts/bench_generate.py --peers ...   # every peer side by side: see scripts/bench/gen_peers.py

    python scripts/bench_generate.py [--prompts 64] [--max-new-tokens 32] [--threads 2] [--workers 1]
        [--baseline-batch 8] [--ours-batch 32] [--skip SYSTEM ...] [--json bench_out/generate.json]

The first --prompts rows of data/generate/prompts.jsonl (one user turn each), rendered with the
GGUF's chat template and tokenized by our `PromptEncoder` (what the CLI's workers do), greedy,
--max-new-tokens, the same --threads for every system, each system in its own process:

1. ours, end to end: `python -m pipeline generate` on a JSONL of the prompts (fresh --out,
   --no-progress) as a subprocess; generated tokens / wall time of the subprocess (start-up:
   python, paddle import, predictor load included), and / report.json's seconds without its
   start-up; stage seconds, prompt padding and decode steps from report.json.
2. ours, engine only: `Generator.generate` on the token ids in a child process, after an untimed
   warm-up batch (the CLI's settings, resolved by `pipeline.config.resolve`).
3. the plain baseline a competitor starts from: PaddleNLP 2.8.1 dynamic-graph
   `LlamaForCausalLM.generate(decode_strategy="greedy_search")` with our fp32 weights, prompts in
   input order, left-padded batches of --baseline-batch rows (position ids from the mask, as
   left padding needs), after an untimed warm-up batch.
4. transformers on torch in .venv-bench (scripts/bench/generate_transformers.py): the same
   weights saved as safetensors in Hugging Face names and [out, in] layout, left-padded batches
   of --baseline-batch rows, input order and sorted by length (longest first), `do_sample=False`.
5. ms per decode step at contexts 32/128/512, batch 8: `scripts/bench_decode_step.py --quick`.

Generated tokens are counted per row up to and including the first EOS (id 2), as ours counts.
Agreement: rows whose greedy tokens equal ours (end-to-end run) exactly; fp32 noise in other
batch shapes can flip a near-tie and everything after it, so a few may differ.
A system that fails is recorded with its error in the table and the JSON; nothing is estimated.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
from gen_driver import trim  # noqa: E402 - generated ids up to and including the first EOS

SAMPLE = ROOT / "data" / "generate" / "prompts.jsonl"
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
EOS = 2
SYSTEMS = ("ours_e2e", "ours_engine", "paddlenlp", "transformers", "decode_step")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_info() -> dict:
    from pipeline.engine.paddle_env import cpu_info as read_cpu

    info = read_cpu()
    return {"model": info["model"] or platform.machine(), "vendor": info["vendor"], "cores": os.cpu_count(),
            "flags": info["flags"]}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in ("paddlepaddle", "paddlenlp", "numpy", "tokenizers"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), FLAGS_paddle_num_threads=str(threads),
               GLOG_minloglevel="2", PYTHONPATH=str(ROOT))
    return env


# ----------------------------------------------------------------------------- child processes


def child_engine(args) -> dict:
    """Our Generator on the token ids, the CLI's settings; one warm-up batch first."""
    from pipeline.config import GenerationOptions, RunConfig, resolve
    from pipeline.engine.generator import Generator
    from pipeline.engine.modeldir import load_model_info

    info = load_model_info(args.model_dir)
    cfg = RunConfig(mode="generate", max_batch_size=args.ours_batch, workers=0, threads=args.threads, streams=1,
                    generation=GenerationOptions(max_new_tokens=args.max_new_tokens))
    settings = resolve(cfg, info).generator
    prompts = json.loads(Path(args.ids).read_text())
    t0 = time.perf_counter()
    gen = Generator(info, settings)
    load_s = time.perf_counter() - t0
    gen.generate(prompts[:8])  # warm-up, untimed
    c0, t0 = os.times(), time.perf_counter()
    cands, stats = gen.generate(prompts)
    wall = time.perf_counter() - t0
    c1 = os.times()
    gen.close()
    out = [list(c[0].token_ids) for c in cands]
    n = sum(len(t) for t in out)
    return {"generated_tokens": n, "seconds": round(wall, 3), "tokens_per_second": round(n / wall, 2),
            "cpu_seconds": round(c1.user + c1.system - c0.user - c0.system, 2), "load_seconds": round(load_s, 2),
            "batches": stats.batches, "decode_steps": stats.step_calls,
            "prompt_padding": round(stats.padded_prompt_tokens / stats.prompt_tokens - 1, 4),
            "prefill_seconds": round(stats.prefill_seconds, 3), "step_seconds": round(stats.step_seconds, 3),
            "settings": {"max_batch_rows": settings.max_batch_rows, "max_cache_mb": settings.max_cache_bytes >> 20,
                         "max_prompt_tokens": settings.max_prompt_tokens, "threads": settings.threads},
            "generated": out}


def child_paddlenlp(args) -> dict:
    """PaddleNLP dygraph LlamaForCausalLM.generate, input order, left-padded fixed-size batches."""
    import zlib  # noqa: F401 - before paddle

    t_start = time.perf_counter()
    import numpy as np
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.convert.decoder import position_ids_from_mask
    from pipeline.convert.gguf_checkpoint import default_gguf_path, read_gguf

    ck = read_gguf(default_gguf_path())
    c = ck.config
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False, use_flash_attention=False,
        use_fused_rms_norm=False, use_fused_rope=False, pad_token_id=EOS, bos_token_id=1, eos_token_id=EOS))
    state = {"llama." + k: v for k, v in ck.weights.items()}
    # Tied embeddings: PaddleNLP's head is [H, V] and cannot share the [V, H] embedding, so it
    # gets its transpose (as tests/convert/test_decoder.py does).
    state["lm_head.weight"] = np.ascontiguousarray(ck.weights["embed_tokens.weight"].T)
    model.set_state_dict(state)
    model.eval()
    del ck, state
    load_s = time.perf_counter() - t_start
    prompts = json.loads(Path(args.ids).read_text())
    B, M = args.baseline_batch, args.max_new_tokens

    def run_batch(rows):
        L = max(len(prompts[i]) for i in rows)
        ids = np.full((len(rows), L), EOS, np.int64)
        mask = np.zeros((len(rows), L), np.int64)
        for b, i in enumerate(rows):
            ids[b, L - len(prompts[i]):], mask[b, L - len(prompts[i]):] = prompts[i], 1
        mask_t = paddle.to_tensor(mask)
        with paddle.no_grad():
            out, _ = model.generate(input_ids=paddle.to_tensor(ids), attention_mask=mask_t,
                                    position_ids=position_ids_from_mask(mask_t), max_new_tokens=M,
                                    decode_strategy="greedy_search", eos_token_id=EOS, pad_token_id=EOS,
                                    use_cache=True)
        return [trim(r) for r in out.numpy().tolist()], L * len(rows), sum(len(prompts[i]) for i in rows)

    run_batch(list(range(min(B, len(prompts)))))  # warm-up, untimed
    gen: list = [None] * len(prompts)
    padded = real = 0
    c0, t0 = os.times(), time.perf_counter()
    for s in range(0, len(prompts), B):
        rows = list(range(s, min(s + B, len(prompts))))
        toks, p, r = run_batch(rows)
        padded, real = padded + p, real + r
        for i, t in zip(rows, toks):
            gen[i] = t
    wall = time.perf_counter() - t0
    c1 = os.times()
    n = sum(len(t) for t in gen)
    return {"generated_tokens": n, "seconds": round(wall, 3), "tokens_per_second": round(n / wall, 2),
            "cpu_seconds": round(c1.user + c1.system - c0.user - c0.system, 2), "load_seconds": round(load_s, 2),
            "batches": -(-len(prompts) // B), "prompt_padding": round(padded / real - 1, 4),
            "paddle_threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                                   "FLAGS_paddle_num_threads")},
            "generated": gen}


def child_export_hf(args) -> dict:
    """Our fp32 weights in Hugging Face names and [out, in] layout (safetensors) + the architecture."""
    import numpy as np
    from safetensors.numpy import save_file

    from pipeline.convert.gguf_checkpoint import default_gguf_path, read_gguf

    ck = read_gguf(default_gguf_path())
    c = ck.config
    assert c.tie_word_embeddings and not (c.attention_bias or c.mlp_bias), "the HF export here assumes SmolLM2's layout"
    state = {}
    for k, v in ck.weights.items():
        # ours: Linear [in, out]; HF: [out, in]. Embedding and norms keep their layout.
        state["model." + k] = np.ascontiguousarray(v.T if k.endswith("_proj.weight") else v, dtype=np.float32)
    out_dir = Path(args.export_hf)
    save_file(state, str(out_dir / "model.safetensors"))
    arch = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.dim_per_head,
            "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "rope_interleaved": getattr(c, "rope_interleaved", False)}
    assert not arch["rope_interleaved"], "HF Llama uses rotate_half RoPE: q/k must be in HF order"
    (out_dir / "config.json").write_text(json.dumps(arch))
    return {"tensors": len(state), "parameters": int(sum(v.size for v in state.values()))}


def child_main(args) -> None:
    try:
        fn = {"engine": child_engine, "paddlenlp": child_paddlenlp, "export-hf": child_export_hf}[args.child]
        res = fn(args)
    except Exception as e:  # noqa: BLE001 - recorded by the parent
        res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        print(res["traceback"], file=sys.stderr)
    Path(args.json).write_text(json.dumps(res))


# ----------------------------------------------------------------------------- the parent


def run_child(cmd: list[str], json_path: Path, threads: int, timeout: float) -> dict:
    """Run a child that writes `json_path`; adds wall time, CPU time and the load around it."""
    la0, r0, t0 = load(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=child_env(threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {timeout:.0f} s", "stderr_tail": str(e.stderr or "")[-2000:]}
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if p.returncode != 0 and "error" not in res:
        res["error"] = f"exit code {p.returncode}"
    if "error" in res:
        res["stderr_tail"] = p.stderr[-2000:]
    res["process"] = {"wall_seconds": round(wall, 2), "load_before": la0, "load_after": load(),
                      "cpu_seconds": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2),
                      "max_rss_mb": round(r1.ru_maxrss / 1024)}
    return res


def ours_e2e(args, tmp: Path, rows: list[dict]) -> dict:
    out = tmp / "ours_out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline", "generate", str(tmp / "prompts.jsonl"), "--out", str(out),
           "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads), "--workers",
           str(args.workers), "--max-batch-size", str(args.ours_batch), "--no-progress"]
    la0, r0, t0 = load(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=args.timeout)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = {"command": " ".join(["python"] + cmd[1:]),
           "process": {"wall_seconds": round(wall, 2), "load_before": la0, "load_after": load(),
                       "cpu_seconds": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2),
                       "max_rss_mb": round(r1.ru_maxrss / 1024)}}
    if p.returncode != 0 or not (out / "report.json").is_file():
        res["error"] = f"exit code {p.returncode}"
        res["stderr_tail"] = p.stderr[-2000:]
        return res
    rep = json.loads((out / "report.json").read_text())
    t, s = rep["tokens"], rep["seconds"]
    gen_by_id = {}
    for line in (out / "generations.jsonl").read_text().splitlines():
        r = json.loads(line)
        gen_by_id[r["id"]] = r["candidates"][0]["token_ids"] if r["candidates"] else []
    n = t["generated"]
    processing = s["total"] - s["startup"]
    res.update({
        "generated_tokens": n, "rows_generated": rep["rows"]["generated"], "rows_rejected": rep["rows"]["rejected"],
        "tokens_per_second_wall": round(n / wall, 2),
        "tokens_per_second_excl_startup": round(n / processing, 2), "report_tokens_per_second":
            round(rep["generated_tokens_per_second"], 2), "processing_seconds": round(processing, 3),
        "stage_seconds": {k: round(v, 3) for k, v in s.items()},
        "prompt_padding": round(t["padding_overhead"], 4), "batches": t["batches"], "decode_steps": t["decode_steps"],
        "row_steps": t["row_steps"], "prompt_tokens": t["prompt"],
        "generated": [gen_by_id.get(r["id"]) for r in rows]})
    return res


def agreement(ref: list | None, got: list | None) -> dict | None:
    if not ref or not got:
        return None
    same = [i for i, (a, b) in enumerate(zip(ref, got)) if a is not None and a == b]
    diff = [i for i in range(len(ref)) if i not in set(same)]
    first = {}
    for i in diff[:10]:
        a, b = ref[i] or [], got[i] or []
        k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
        first[i] = k
    return {"identical_rows": len(same), "rows": len(ref), "differing_rows": diff,
            "first_differing_position": first}


def fmt_err(res: dict) -> str:
    return "FAILED: " + res.get("error", "?").splitlines()[0][:90]


def main() -> None:
    if "--peers" in sys.argv[1:]:
        # The side-by-side peers benchmark (greedy and beam, 1 and 2 threads, CTranslate2 and
        # llama.cpp too): scripts/bench/gen_peers.py, with its own flags.
        sys.path.insert(0, str(ROOT / "scripts" / "bench"))
        from gen_peers import main as peers_main

        sys.exit(peers_main(sys.argv[1:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64, help="the first N prompts of the sample")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="tokenizer processes of our CLI run")
    ap.add_argument("--baseline-batch", type=int, default=8)
    ap.add_argument("--ours-batch", type=int, default=32, help="our --max-batch-size (the CLI's default: 32)")
    ap.add_argument("--input", type=Path, default=SAMPLE)
    ap.add_argument("--skip", nargs="*", default=[], choices=SYSTEMS)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", type=Path, default=ROOT / "bench_out" / "generate.json")
    # child process modes
    ap.add_argument("--child", choices=["engine", "paddlenlp", "export-hf"], help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--export-hf", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return

    from pipeline.cli import default_generation_model
    from pipeline.engine.prompt_text import PromptEncoderSpec
    from pipeline.engine.text import TokenizeRequest

    t_all = time.perf_counter()
    info = default_generation_model()
    rows = [json.loads(line) for line in args.input.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:args.prompts]
    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        with open(tmp / "prompts.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"id": r["id"], "messages": r["messages"]}, ensure_ascii=False) + "\n")
        max_prompt = min(512, info.max_seq_len - args.max_new_tokens)  # the CLI's default limit
        enc = PromptEncoderSpec.of(info, max_prompt).build().run(TokenizeRequest("messages", 0, [r["messages"] for r in rows]))
        assert not enc.failed and not enc.truncated, (enc.failed, enc.truncated)
        ids = enc.ids
        (tmp / "ids.json").write_text(json.dumps(ids))
        report = {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)", "model_dir": str(info.path),
            "prompts": len(rows), "input": str(args.input), "max_new_tokens": args.max_new_tokens,
            "threads": args.threads, "workers": args.workers, "baseline_batch": args.baseline_batch,
            "ours_max_batch_size": args.ours_batch,
            "prompt_tokens": {"total": sum(map(len, ids)), "min": min(map(len, ids)), "max": max(map(len, ids))},
            "machine": cpu_info(), "versions": versions(), "load_start": load(),
            "uptime": subprocess.run(["uptime"], stdout=subprocess.PIPE, text=True).stdout.strip(), "systems": {}}
        m = report["machine"]
        print(f"CPU: {m['model']} ({m['cores']} cores; {', '.join(m['flags'])}); load {report['load_start']}; "
              f"{len(rows)} prompts, {report['prompt_tokens']['total']} prompt tokens "
              f"({report['prompt_tokens']['min']}-{report['prompt_tokens']['max']}), {args.max_new_tokens} new tokens, "
              f"{args.threads} threads", flush=True)
        S = report["systems"]
        me = [sys.executable, str(Path(__file__).resolve())]
        common = ["--ids", str(tmp / "ids.json"), "--max-new-tokens", str(args.max_new_tokens), "--threads",
                  str(args.threads), "--baseline-batch", str(args.baseline_batch), "--ours-batch", str(args.ours_batch),
                  "--model-dir", str(info.path)]

        def step(name, fn):
            if name in args.skip:
                S[name] = {"skipped": True}
                return
            print(f"-- {name} (load {load()})", flush=True)
            try:
                S[name] = fn()
            except Exception as e:  # noqa: BLE001
                S[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            if "error" in S[name]:
                print(f"   {name} failed: {S[name]['error']}\n{S[name].get('stderr_tail', '')[-800:]}", flush=True)

        step("ours_e2e", lambda: ours_e2e(args, tmp, rows))
        step("ours_engine", lambda: run_child(me + ["--child", "engine", "--json", str(tmp / "engine.json")] + common,
                                              tmp / "engine.json", args.threads, args.timeout))
        step("paddlenlp", lambda: run_child(me + ["--child", "paddlenlp", "--json", str(tmp / "pnlp.json")] + common,
                                            tmp / "pnlp.json", args.threads, args.timeout))

        def transformers():
            if not BENCH_PYTHON.is_file():
                return {"error": f"{BENCH_PYTHON} not found (create .venv-bench from requirements-reference.txt)"}
            hf = tmp / "hf"
            hf.mkdir(exist_ok=True)
            exp = run_child(me + ["--child", "export-hf", "--export-hf", str(hf), "--json", str(tmp / "exp.json")],
                            tmp / "exp.json", args.threads, args.timeout)
            if "error" in exp:
                return {"error": "weight export: " + exp["error"], "export": exp}
            res = run_child([str(BENCH_PYTHON), str(ROOT / "scripts" / "bench" / "generate_transformers.py"),
                             "--weights", str(hf / "model.safetensors"), "--config", str(hf / "config.json"),
                             "--prompts", str(tmp / "ids.json"), "--max-new-tokens", str(args.max_new_tokens),
                             "--threads", str(args.threads), "--batch", str(args.baseline_batch), "--prefill-split",
                             "--json", str(tmp / "hf.json")], tmp / "hf.json", args.threads, args.timeout)
            res["export"] = exp
            return res

        step("transformers", transformers)

        def decode_step():
            path = tmp / "decode_step.json"
            la0, t0 = load(), time.perf_counter()
            p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_decode_step.py"), "--quick",
                                "--threads", str(args.threads), "--batch", "8", "--json", str(path)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=args.timeout)
            if p.returncode != 0 or not path.is_file():
                return {"error": f"exit code {p.returncode}", "stderr_tail": p.stderr[-2000:]}
            d = json.loads(path.read_text())
            v = d["variants"][0]
            return {"rows": v["rows"], "ms_per_100_columns": v["ms_per_100_columns"],
                    "mean_ms_64_steps_from_128": v.get("mean_ms_64_steps_from_128"), "linear": d.get("linear"),
                    "batch": d["batch"], "threads": d["threads"],
                    "process": {"wall_seconds": round(time.perf_counter() - t0, 1), "load_before": la0,
                                "load_after": load()}}

        step("decode_step", decode_step)
        report["load_end"] = load()
        report["seconds_total"] = round(time.perf_counter() - t_all, 1)

        # ------------------------------------------------------------------ agreement and table
        ref = S.get("ours_e2e", {}).get("generated")
        for name in ("ours_engine", "paddlenlp"):
            if S.get(name, {}).get("generated") is not None:
                S[name]["agreement_with_ours"] = agreement(ref, S[name]["generated"])
        for order, o in S.get("transformers", {}).get("orders", {}).items():
            o["agreement_with_ours"] = agreement(ref, o["generated"])
        table, speed = render(report, args)
        report["speedups"] = speed
        print("\n" + table)
        for sys_ in S.values():  # the token ids are not kept in the JSON (agreement is)
            sys_.pop("generated", None)
            for o in sys_.get("orders", {}).values():
                o.pop("generated", None)
        report["table"] = table
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"JSON: {args.json}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def render(report: dict, args) -> tuple[str, dict]:
    S, N = report["systems"], report["prompts"]
    lines = [f"Generated tokens/s, SmolLM2-135M fp32 greedy, {N} prompts, max {args.max_new_tokens} new tokens, "
             f"{args.threads} threads; our --max-batch-size {args.ours_batch}; CPU {report['machine']['model']}; "
             f"load {report['load_start']} at start, "
             f"{report['load_end']} at end", "",
             "| system | batches | generated tokens | seconds | tokens/s | CPU s / wall s | load (before/after) | "
             "rows identical to ours |", "|---|---|---|---|---|---|---|---|"]

    def agree(a):
        return f"{a['identical_rows']}/{a['rows']}" if a else "-"

    def proc(r):
        p = r.get("process", {})
        return p.get("load_before", "-"), p.get("load_after", "-")

    e = S.get("ours_e2e", {})
    if e.get("skipped"):
        pass
    elif "error" in e:
        lines.append(f"| ours, end to end (`python -m pipeline generate`) | - | - | - | {fmt_err(e)} | - | - | - |")
    else:
        p = e["process"]
        lines.append(f"| ours, end to end, wall of the CLI process (start-up included) | {e['batches']} "
                     f"(sorted, KV budget) | {e['generated_tokens']} | {p['wall_seconds']:.1f} | "
                     f"{e['tokens_per_second_wall']:.1f} | {p['cpu_seconds'] / p['wall_seconds']:.2f} | "
                     f"{p['load_before']}/{p['load_after']} | (reference) |")
        lines.append(f"| ours, end to end, report.json without start-up ({e['stage_seconds']['startup']:.1f} s) | "
                     f"{e['batches']} | {e['generated_tokens']} | {e['processing_seconds']:.1f} | "
                     f"{e['tokens_per_second_excl_startup']:.1f} | - | - | (reference) |")
    g = S.get("ours_engine", {})
    if not g.get("skipped"):
        if "error" in g:
            lines.append(f"| ours, engine only (Generator.generate) | - | - | - | {fmt_err(g)} | - | - | - |")
        else:
            lines.append(f"| ours, engine only (Generator.generate, warm) | {g['batches']} | {g['generated_tokens']} | "
                         f"{g['seconds']:.1f} | {g['tokens_per_second']:.1f} | {g['cpu_seconds'] / g['seconds']:.2f} | "
                         "{}/{} | {} |".format(*proc(g), agree(g.get("agreement_with_ours"))))
    b = S.get("paddlenlp", {})
    if not b.get("skipped"):
        if "error" in b:
            lines.append(f"| PaddleNLP dygraph LlamaForCausalLM.generate | - | - | - | {fmt_err(b)} | - | - | - |")
        else:
            lines.append(f"| PaddleNLP {report['versions'].get('paddlenlp')} dygraph generate (input order, batch "
                         f"{args.baseline_batch}) | {b['batches']} | {b['generated_tokens']} | {b['seconds']:.1f} | "
                         f"{b['tokens_per_second']:.1f} | {b['cpu_seconds'] / b['seconds']:.2f} | "
                         "{}/{} | {} |".format(*proc(b), agree(b.get("agreement_with_ours"))))
    t = S.get("transformers", {})
    if not t.get("skipped"):
        if "error" in t:
            lines.append(f"| transformers on torch | - | - | - | {fmt_err(t)} | - | - | - |")
        else:
            v = t.get("versions", {})
            for order, o in t["orders"].items():
                lines.append(f"| transformers {v.get('transformers')} / torch {v.get('torch')} ({t.get('attn_implementation')}"
                             f", {order}, batch {args.baseline_batch}) | {o['batches']} | {o['generated_tokens']} | "
                             f"{o['seconds']:.1f} | {o['tokens_per_second']:.1f} | {o['cpu_seconds'] / o['seconds']:.2f} | "
                             "{}/{} | {} |".format(*proc(t), agree(o.get("agreement_with_ours"))))
    if e and "error" not in e and not e.get("skipped"):
        s = e["stage_seconds"]
        lines += ["", f"ours end to end: stages (s) startup {s['startup']:.2f}, tokenize {s['tokenize']:.2f} "
                      f"(wait {s['tokenize_wait']:.2f}), prefill {s['prefill']:.2f}, decode_steps {s['decode_steps']:.2f}, "
                      f"detokenize {s['detokenize']:.2f}, write {s['write']:.2f}, total {s['total']:.2f}; prompt padding "
                      f"{100 * e['prompt_padding']:.1f}%; {e['batches']} batches, {e['decode_steps']} decode steps, "
                      f"{e['row_steps']} row steps"]
    if t and "error" not in t and not t.get("skipped") and "sorted_prefill_only_seconds" in t:
        pre = t["sorted_prefill_only_seconds"]
        tot = t["orders"].get("sorted", {}).get("seconds")
        lines.append(f"transformers sorted: prompt pass alone (max_new_tokens=1) {pre:.2f} s"
                     + (f", so about {tot - pre:.2f} s of decode steps" if tot else ""))
    if b and "error" not in b and not b.get("skipped"):
        lines.append(f"PaddleNLP baseline: prompt padding {100 * b['prompt_padding']:.1f}%, model build + weights "
                     f"{b['load_seconds']:.1f} s (not timed)")
    d = S.get("decode_step", {})
    if d and not d.get("skipped"):
        if "error" in d:
            lines += ["", f"decode step: {fmt_err(d)}"]
        else:
            lines += ["", f"ms per decode step, batch {d['batch']}, {d['threads']} threads (bench_decode_step.py --quick, "
                          f"load {d['process']['load_before']}/{d['process']['load_after']}): "
                      + ", ".join(f"ctx {r['context']}: {r['ms_per_step']:.1f} (min {r['ms_min']:.1f})" for r in d["rows"])
                      + f"; mean of 64 steps from 128: {d['mean_ms_64_steps_from_128']} ms"]
    speed = {}
    if e and "error" not in e and not e.get("skipped"):
        if b and "error" not in b and not b.get("skipped"):
            speed["e2e_wall_vs_paddlenlp"] = round(e["tokens_per_second_wall"] / b["tokens_per_second"], 2)
            speed["e2e_excl_startup_vs_paddlenlp"] = round(e["tokens_per_second_excl_startup"] / b["tokens_per_second"], 2)
        if t and "error" not in t and not t.get("skipped"):
            for order, o in t["orders"].items():
                speed[f"e2e_wall_vs_transformers_{order}"] = round(e["tokens_per_second_wall"] / o["tokens_per_second"], 2)
                speed[f"e2e_excl_startup_vs_transformers_{order}"] = round(
                    e["tokens_per_second_excl_startup"] / o["tokens_per_second"], 2)
    if g and "error" not in g and not g.get("skipped"):
        if b and "error" not in b and not b.get("skipped"):
            speed["engine_vs_paddlenlp"] = round(g["tokens_per_second"] / b["tokens_per_second"], 2)
        if t and "error" not in t and not t.get("skipped"):
            for order, o in t["orders"].items():
                speed[f"engine_vs_transformers_{order}"] = round(g["tokens_per_second"] / o["tokens_per_second"], 2)
    if speed:
        lines += ["", "speed-ups (generated tokens/s ratios; targets: >= 10x the PaddleNLP baseline end to end, "
                      "> 1x transformers at fp32):"]
        lines += [f"  {k}: {v:.2f}x" for k, v in speed.items()]
    return "\n".join(lines), speed


if __name__ == "__main__":
    main()
