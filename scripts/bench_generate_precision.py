"""Reduced precision for the decoder on the CPU: fp32 / bf16 / int8, prefill and decode speed,
end-to-end tokens/s, and the quality against fp32.

    python scripts/bench_generate_precision.py [--model-dir DIR] [--int8-dir DIR] [--threads 2]
        [--batches 1 8 32] [--context 128] [--prompts 64] [--max-new-tokens 32]
        [--stages ops micro verbose e2e] [--isa native avx2] [--json bench_out/generate_precision.json]

Every figure runs in its own child process (fresh predictors, `ONEDNN_MAX_CPU_ISA=AVX2` set in
the child's environment for the AVX2-emulated rows: oneDNN then dispatches as on an AVX2-only
CPU such as Zen 3, where bf16 has no kernels and is skipped).

- ops: the op types of the prefill and decode programs as Paddle runs them at each precision,
  with their oneDNN data type (`engine/decoder_precision.optimized_ops`).
- micro: `DecoderPredictor` on random token ids: prefill ms of a [8, context] batch (median of
  3 after a warm-up), and ms per decode step at each batch size after a [B, context] prefill
  (median of 8 steps after 2 warm-up steps). Variants: fp32 (the default: decode program
  without IR passes), fp32 with IR passes on the decode program, bf16, int8 (with --int8-dir).
- verbose: `ONEDNN_VERBOSE=1` over one prefill and two decode steps at batch 8: the oneDNN
  primitives executed, by kind, implementation and data types (int8 shows as u8s8 / s8s8
  inner products or matmuls; bf16 as bf16 ones).
- e2e: `python -m pipeline generate` on the first --prompts prompts of the sample (greedy,
  --max-new-tokens) at each precision: generated tokens/s from report.json (start-up excluded),
  its ROUGE-L and BLEU, and the share of rows whose text equals the fp32 run's.

The table names the CPU; figures measured while anything else used the CPU are worthless (run it
under `flock /tmp/cpu.lock`).
"""

from __future__ import annotations

import zlib  # noqa: F401 - before paddle

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT / "data" / "generate" / "prompts.jsonl"
MICRO_VARIANTS = ("fp32", "fp32-ir", "bf16", "bf16-mul", "int8")
# bf16: the prefill program in bf16 with the Linears kept as oneDNN matmuls (the passes that map
# them to `mul` deleted), decode fp32 (engine/decoder_precision.py); bf16-mul: Paddle's default passes
MAP_PASSES = ("gpu_cpu_map_matmul_v2_to_mul_pass", "gpu_cpu_map_matmul_v2_to_matmul_pass")


def _variant_precision(variant: str) -> str:
    import pipeline.engine.decoder_precision as dp

    if variant == "bf16-mul":  # Paddle's default passes: the Linears become `mul` (no bf16 kernel)
        dp.BF16_DELETED_PASSES = ()
    return "fp32" if variant.startswith("fp32") else variant.split("-")[0]
STAGES = ("ops", "micro", "verbose", "e2e")


def cpu_report(avx2: bool) -> dict:
    from pipeline.engine.cpu import CpuFeatures

    env = {**os.environ, **({"ONEDNN_MAX_CPU_ISA": "AVX2"} if avx2 else {})}
    return CpuFeatures.detect(environ=env).to_dict()


# ----------------------------------------------------------------------------- children


def _predictor(model_dir: Path, variant: str, batch: int, max_len: int, threads: int):
    from pipeline.engine.decoder_predictor import DecoderPredictor

    precision = _variant_precision(variant)
    from pipeline.paths import cache_dir

    return DecoderPredictor(model_dir, batch, max_len, threads=threads, precision=precision,
                            decode_ir_optim=True if variant == "fp32-ir" else None, optimized_cache=cache_dir())


def _inputs(batch: int, cols: int, vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, cols), dtype=np.int64)
    pos = np.broadcast_to(np.arange(cols, dtype=np.int64), (batch, cols)).copy()
    return ids, pos, np.ones((batch, cols), np.float32)


def child_micro(args) -> dict:
    import numpy as np

    from pipeline.engine.modeldir import load_model_info

    info = load_model_info(args.model_dir)
    out: dict = {"variant": args.variant, "decode_ms": {}}
    biggest = max(max(args.batches), 8)
    t0 = time.perf_counter()
    p = _predictor(args.model_dir, args.variant, biggest, args.context + 16, args.threads)
    out["create_s"] = round(time.perf_counter() - t0, 2)
    ids, pos, mask = _inputs(8, args.context, info.vocab_size)
    times = []
    for r in range(4):
        t0 = time.perf_counter()
        p.prefill(ids, pos, mask)
        if r:
            times.append(1000 * (time.perf_counter() - t0))
    out["prefill_ms"] = round(statistics.median(times), 1)
    out["prefill_shape"] = [8, args.context]
    for b in args.batches:
        ids, pos, mask = _inputs(b, args.context, info.vocab_size, seed=b)
        p.prefill(ids, pos, mask)
        steps = []
        for s in range(10):
            T = p.length
            m = np.ones((b, T + 1), np.float32)
            t0 = time.perf_counter()
            logits = p.step(ids[:, :1], np.full((b, 1), T, np.int64), m)
            if s >= 2:
                steps.append(1000 * (time.perf_counter() - t0))
        assert np.isfinite(logits).all()
        out["decode_ms"][str(b)] = round(statistics.median(steps), 1)
    return out


def child_ops(args) -> dict:
    from pipeline.engine.decoder_io import DECODE_PROGRAM, PREFILL_PROGRAM
    from pipeline.engine.decoder_precision import (decode_ir_optim_default, decode_precision_default, optimized_ops,
                                                   params_file, prepared_program, program_ops)
    from pipeline.paths import cache_dir

    precision = _variant_precision(args.variant)
    res = {}
    for prog in (PREFILL_PROGRAM, DECODE_PROGRAM):
        prec = precision if prog == PREFILL_PROGRAM else decode_precision_default(precision)
        ir = True if prog == PREFILL_PROGRAM or args.variant == "fp32-ir" else decode_ir_optim_default(prec)
        params = params_file(args.model_dir, prog)
        if prec == "bf16":  # the program the predictor runs, saved once (the bf16 passes take minutes)
            from pipeline.engine.cpu import CpuFeatures

            ops = program_ops(prepared_program(args.model_dir / prog, params, prec, args.threads, cache_dir(),
                                               CpuFeatures.detect().isa)[0])
        else:
            ops = optimized_ops(args.model_dir / prog, params, prec, ir_optim=ir)
        res[prog] = {f"{t}[{k}]": n for (t, k), n in sorted(ops.items())}
    return {"variant": args.variant, "ops": res}


def child_verbose(args) -> None:
    """Runs with ONEDNN_VERBOSE=1 in its environment; the parent parses the lines."""
    import numpy as np

    from pipeline.engine.modeldir import load_model_info

    info = load_model_info(args.model_dir)
    p = _predictor(args.model_dir, args.variant, 8, args.context + 8, args.threads)
    ids, pos, mask = _inputs(8, args.context, info.vocab_size)
    p.prefill(ids, pos, mask)
    print("=== decode ===", flush=True)
    for _ in range(2):
        T = p.length
        p.step(ids[:, :1], np.full((8, 1), T, np.int64), np.ones((8, T + 1), np.float32))
    sys.stdout.flush()


def summarize_verbose(text: str) -> dict:
    """oneDNN exec lines -> {stage: {"kind impl dt": count}}: the GEMM-like primitives by
    implementation and data types (src/wei/dst)."""
    stages: dict = {"prefill": Counter(), "decode": Counter()}
    stage = "prefill"
    isa = None
    for line in text.splitlines():
        if line.startswith("=== decode"):
            stage = "decode"
            continue
        if "onednn_verbose,info,cpu,isa:" in line:
            isa = line.split("isa:", 1)[1].strip()
        if not line.startswith("onednn_verbose,") or ",exec," not in line:
            continue
        f = line.split(",")
        # onednn_verbose,[timestamp,]exec,cpu,KIND,IMPL,PROP,MEM DESCS,...
        i = f.index("exec")
        kind, impl, mds = f[i + 2], f[i + 3], f[i + 5]
        if kind not in ("inner_product", "matmul", "convolution"):
            continue
        dts = "/".join(m.split(":")[1] for m in mds.split(" ") if ":" in m and m.split("_")[0] in ("src", "wei", "dst"))
        stages[stage][f"{kind} {impl} {dts}"] += 1
    return {"isa": isa, **{k: dict(v.most_common()) for k, v in stages.items()}}


def child_main(args) -> None:
    if args.child == "micro":
        print(json.dumps(child_micro(args)))
    elif args.child == "ops":
        print(json.dumps(child_ops(args)))
    elif args.child == "verbose":
        child_verbose(args)


# ----------------------------------------------------------------------------- parent


def run_child(args, stage: str, variant: str, model_dir: Path, avx2: bool, verbose: bool = False):
    env = {**os.environ, "GLOG_minloglevel": "3", "OMP_NUM_THREADS": str(args.threads)}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if avx2:
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    if verbose:
        env["ONEDNN_VERBOSE"] = "1"
    cmd = [sys.executable, __file__, "--child", stage, "--variant", variant, "--model-dir", str(model_dir),
           "--threads", str(args.threads), "--context", str(args.context),
           "--batches", *map(str, args.batches)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        return {"variant": variant, "error": proc.stderr.strip().splitlines()[-3:], "rc": proc.returncode}
    if verbose:
        return {"variant": variant, **summarize_verbose(proc.stdout), "seconds": round(time.perf_counter() - t0, 1)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def e2e(args, precision: str, model_dir: Path, avx2: bool, prompts: Path, out: Path) -> dict:
    env = {**os.environ, "GLOG_minloglevel": "3"}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if avx2:
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    cmd = [sys.executable, "-m", "pipeline", "generate", str(prompts), "--model", str(model_dir), "--out", str(out),
           "--precision", precision, "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
           "--no-progress", "--workers", "1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"precision": precision, "error": proc.stderr.strip().splitlines()[-3:], "rc": proc.returncode}
    rep = json.loads((out / "report.json").read_text())
    texts = [line.split("\t", 1)[1] if "\t" in line else "" for line in
             (out / "predictions.tsv").read_text().splitlines()[1:]]
    metrics = rep.get("metrics", {})
    return {"precision": precision, "wall_s": round(wall, 1), "report": rep, "texts": texts,
            "tokens_per_s": rep.get("tokens_per_second") or rep.get("generated_tokens_per_second"),
            "metrics": metrics, "precision_record": rep.get("precision")}


def find_tps(rep: dict):
    """Generated tokens/s without start-up, wherever report.json keeps it."""
    for path in (("speed", "generated_tokens_per_s"), ("generated_tokens_per_second",), ("tokens_per_second",)):
        v = rep
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            return v
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=["micro", "ops", "verbose"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, default=None, help="fp32 decoder directory (default: SmolLM2 in the cache)")
    ap.add_argument("--int8-dir", type=Path, default=None, help="an int8 decoder directory from `quantize`")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--variants", nargs="+", choices=MICRO_VARIANTS, default=list(MICRO_VARIANTS))
    ap.add_argument("--isa", nargs="+", choices=["native", "avx2"], default=["native", "avx2"])
    ap.add_argument("--json", type=Path, default=ROOT / "bench_out" / "generate_precision.json")
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    if args.model_dir is None:
        from pipeline.cli import default_generation_model

        args.model_dir = default_generation_model().path
    report: dict = {"cpu": {isa: cpu_report(isa == "avx2") for isa in args.isa}, "threads": args.threads,
                    "context": args.context, "model_dir": str(args.model_dir),
                    "int8_dir": str(args.int8_dir) if args.int8_dir else None,
                    "load_before": os.getloadavg()[0], "results": {}}

    def variants(isa: str):
        for v in args.variants:
            if v == "int8" and args.int8_dir is None:
                continue
            if v.startswith("bf16") and not report["cpu"][isa]["bf16"]:
                continue  # no bf16 kernels: Paddle would run fp32, and the pipeline refuses it
            if isa == "avx2" and v == "fp32-ir":
                continue
            yield v, (args.int8_dir if v == "int8" else args.model_dir)

    for isa in args.isa:
        res = report["results"].setdefault(isa, {})
        avx2 = isa == "avx2"
        if "ops" in args.stages and not avx2:
            res["ops"] = [run_child(args, "ops", v, d, avx2) for v, d in variants(isa)]
        if "micro" in args.stages:
            res["micro"] = []
            for v, d in variants(isa):
                res["micro"].append(run_child(args, "micro", v, d, avx2))
                print(f"[{isa}] micro {v}: {res['micro'][-1]}", file=sys.stderr)
        if "verbose" in args.stages:
            res["verbose"] = [run_child(args, "verbose", v, d, avx2, verbose=True) for v, d in variants(isa)
                              if v != "fp32-ir"]
        if "e2e" in args.stages:
            with tempfile.TemporaryDirectory() as tmp:
                prompts = Path(tmp) / "prompts.jsonl"
                prompts.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:args.prompts]))
                runs = {}
                for v, d in variants(isa):
                    if v == "fp32-ir":
                        continue
                    runs[v] = e2e(args, v, d, avx2, prompts, Path(tmp) / f"out-{v}")
                    print(f"[{isa}] e2e {v}: {find_tps(runs[v].get('report', {}))} tokens/s", file=sys.stderr)
                ref = runs.get("fp32", {}).get("texts")
                res["e2e"] = []
                for v, r in runs.items():
                    if "error" in r:
                        res["e2e"].append(r)
                        continue
                    rep = r["report"]
                    same = None if ref is None else sum(a == b for a, b in zip(ref, r["texts"])) / max(1, len(ref))
                    res["e2e"].append({"precision": v, "tokens_per_s": find_tps(rep), "wall_s": r["wall_s"],
                                       "stage_seconds": rep.get("seconds"), "metrics": rep.get("metrics"),
                                       "identical_to_fp32": same, "precision_record": rep.get("precision")})
    report["load_after"] = os.getloadavg()[0]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(render(report))
    print(f"\nJSON: {args.json}")


def render(report: dict) -> str:
    lines = []
    for isa, res in report["results"].items():
        cpu = report["cpu"][isa]
        lines.append(f"\n## {isa}: {cpu['model']}, oneDNN ISA {cpu['isa']}, {report['threads']} threads, "
                     f"context {report['context']}")
        if res.get("micro"):
            bs = sorted({b for m in res["micro"] for b in m.get("decode_ms", {})}, key=int)
            lines.append("| variant | prefill ms [8 x ctx] | " + " | ".join(f"decode ms/step b={b}" for b in bs) + " |")
            lines.append("|---" * (2 + len(bs)) + "|")
            for m in res["micro"]:
                if "error" in m:
                    lines.append(f"| {m['variant']} | error: {m['error']} |")
                    continue
                lines.append(f"| {m['variant']} | {m['prefill_ms']} | "
                             + " | ".join(str(m['decode_ms'].get(b, '-')) for b in bs) + " |")
        if res.get("e2e"):
            lines.append("| precision | tokens/s (no start-up) | ROUGE-L | BLEU | identical to fp32 |")
            lines.append("|---|---|---|---|---|")
            for e in res["e2e"]:
                if "error" in e:
                    lines.append(f"| {e['precision']} | error: {e['error']} |")
                    continue
                m = e.get("metrics") or {}
                lines.append(f"| {e['precision']} | {e['tokens_per_s']} | {m.get('rouge_l', m.get('rougeL'))} | "
                             f"{m.get('bleu')} | {e['identical_to_fp32']} |")
        for v in res.get("verbose", []):
            lines.append(f"verbose {v['variant']} (isa {v.get('isa')}): decode {v.get('decode', v.get('error'))}")
        for o in res.get("ops", []):
            lines.append(f"ops {o['variant']}: {o.get('ops', o.get('error'))}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
