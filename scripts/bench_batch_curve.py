"""Tokens/s against batch size, separately for prefill and for decode steps (SmolLM2-135M fp32).

    python scripts/bench_batch_curve.py [--threads 2] [--prompt-len 96] [--context 160]
        [--prefill-batches 1 2 4 8 16 32] [--decode-batches 1 2 4 8 16 32 64] [--rounds 3]
        [--json bench_out/batch_curve.json] [--png bench_out/batch_curve.png]

Prefill and decode have different costs: a prompt pass multiplies [B x L, hidden] activations by
every weight matrix (compute-bound once B x L is large), a decode step multiplies [B, hidden]
by them (it reads every weight, and every row's cache, for one token per row: memory-bound at
small B). This measures each on its own, on `DecoderPredictor` (the runtime the pipeline uses,
the default model directory from `.cache/models/`, converted on first use):

- prefill: B prompts of `--prompt-len` random tokens each (similar-length prompts, as one
  prefill group holds), one `prefill` call; prompt tokens/s = B x L / seconds;
- decode: B rows at a fixed context of `--context` columns (a [1, context] prefill copied to B
  rows with `select`), `--steps` timed steps after `--warmup`, each followed by `truncate` back
  to the context so every step sees the same context; generated tokens/s = B / seconds per step.

Rounds alternate the batch sizes so the machine's drift hits all alike; medians (and min) per
size. Prints a table, writes JSON and, when matplotlib is installed, a PNG of both curves.
"""

from __future__ import annotations

import zlib  # noqa: F401 - before paddle (see pipeline/engine/predictor.py)

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def cpu_info() -> dict:
    from pipeline.engine.paddle_env import cpu_info as read_cpu

    info = read_cpu()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"model": info["model"] or platform.machine(), "vendor": info["vendor"], "cores": os.cpu_count(),
            "flags": [f for f in wanted if f in info["flags"]],
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}


def time_prefill(pred, vocab: int, batch: int, length: int, rng) -> float:
    ids = rng.integers(3, vocab, (batch, length))
    pos = np.broadcast_to(np.arange(length), (batch, length)).copy()
    mask = np.ones((batch, length), np.int64)
    t0 = time.perf_counter()
    pred.prefill(ids, pos, mask)
    return time.perf_counter() - t0


def time_decode(pred, vocab: int, batch: int, context: int, steps: int, warmup: int, rng) -> list[float]:
    pred.prefill(rng.integers(3, vocab, (1, context)), np.arange(context)[None], np.ones((1, context), np.int64))
    pred.select(np.zeros(batch, np.int64))
    tok = rng.integers(3, vocab, (batch, 1))
    pos = np.full((batch, 1), context)
    mask = np.ones((batch, context + 1), np.int64)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        pred.step(tok, pos, mask)
        dt = time.perf_counter() - t0
        pred.truncate(context)
        if i >= warmup:
            times.append(dt)
    return times


def summarise(samples: dict[int, list[float]], work) -> list[dict]:
    rows = []
    for b, secs in samples.items():
        med, best = statistics.median(secs), min(secs)
        rows.append({"batch": b, "ms": round(med * 1e3, 2), "ms_min": round(best * 1e3, 2),
                     "tokens_per_s": round(work(b) / med, 1), "tokens_per_s_best": round(work(b) / best, 1),
                     "samples": len(secs)})
    return rows


def knee(rows: list[dict], within: float) -> int:
    """The smallest batch whose tokens/s is within `within` (a fraction) of the best measured."""
    best = max(r["tokens_per_s"] for r in rows)
    return min(r["batch"] for r in rows if r["tokens_per_s"] >= (1 - within) * best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=96, help="prefill: tokens per prompt")
    ap.add_argument("--context", type=int, default=160, help="decode: cached columns per row")
    ap.add_argument("--prefill-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="decode: timed steps per size and round")
    ap.add_argument("--warmup", type=int, default=2, help="decode: untimed steps per size and round")
    ap.add_argument("--model-dir", type=Path, default=None, help="a decoder directory (default: the default model)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench_out" / "batch_curve.json")
    ap.add_argument("--png", type=Path, default=ROOT / "bench_out" / "batch_curve.png")
    args = ap.parse_args()

    from pipeline.engine.decoder_predictor import DecoderPredictor

    if args.model_dir is None:
        from pipeline.cli import default_generation_model

        model_dir = Path(default_generation_model().path)
    else:
        model_dir = args.model_dir
    info = json.loads((model_dir / "model.json").read_text())
    vocab = int(info["architecture"]["vocab_size"])
    rows_max = max(args.prefill_batches + args.decode_batches + [4])
    pred = DecoderPredictor(model_dir, rows_max, max(args.prompt_len, args.context) + 8, threads=args.threads)
    rng = np.random.default_rng(0)
    time_prefill(pred, vocab, 4, args.prompt_len, rng)  # warm oneDNN's kernels for the shapes' family
    time_decode(pred, vocab, 4, args.context, 2, 1, rng)
    pre: dict[int, list[float]] = {b: [] for b in args.prefill_batches}
    dec: dict[int, list[float]] = {b: [] for b in args.decode_batches}
    for r in range(args.rounds):
        for b in args.prefill_batches:
            time_prefill(pred, vocab, b, args.prompt_len, rng)  # untimed: the first call of a shape
            pre[b].append(time_prefill(pred, vocab, b, args.prompt_len, rng))
        for b in args.decode_batches:
            dec[b] += time_decode(pred, vocab, b, args.context, args.steps, args.warmup, rng)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    prefill_rows = summarise(pre, lambda b: b * args.prompt_len)
    decode_rows = summarise(dec, lambda b: b)
    cpu = cpu_info()
    report = {"model": str(model_dir), "threads": args.threads, "prompt_len": args.prompt_len,
              "context": args.context, "rounds": args.rounds, "steps": args.steps, "cpu": cpu,
              "prefill": prefill_rows, "decode": decode_rows,
              "prefill_knee_within_10pct": knee(prefill_rows, 0.10),
              "decode_knee_within_10pct": knee(decode_rows, 0.10)}
    print(f"CPU: {cpu['model']} ({', '.join(cpu['flags'])}), {cpu['cores']} cores; threads {args.threads}")
    print(f"\nprefill: B prompts x {args.prompt_len} tokens, one call (median of {args.rounds}; min)")
    print("| batch | ms per call | prompt tokens/s | ms per prompt |\n|---|---|---|---|")
    for r in prefill_rows:
        print(f"| {r['batch']} | {r['ms']:.0f} ({r['ms_min']:.0f}) | {r['tokens_per_s']:.0f} | {r['ms'] / r['batch']:.1f} |")
    print(f"\ndecode: B rows at context {args.context} (median of {args.rounds} x {args.steps} steps; min)")
    print("| batch | ms per step | generated tokens/s | ms per token |\n|---|---|---|---|")
    for r in decode_rows:
        print(f"| {r['batch']} | {r['ms']:.1f} ({r['ms_min']:.1f}) | {r['tokens_per_s']:.1f} | {r['ms'] / r['batch']:.2f} |")
    print(f"\nsmallest batch within 10% of the best tokens/s: prefill {report['prefill_knee_within_10pct']}, "
          f"decode {report['decode_knee_within_10pct']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"JSON: {args.json}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rows, what in ((axes[0], prefill_rows, f"prefill ({args.prompt_len}-token prompts)"),
                           (axes[1], decode_rows, f"decode (context {args.context})")):
        ax.plot([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (rows)")
        ax.set_ylabel("prompt tokens/s" if rows is prefill_rows else "generated tokens/s")
        ax.set_title(what)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"SmolLM2-135M fp32, {args.threads} threads, {cpu['model']}", fontsize=9)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=100)
    print(f"PNG: {args.png}")


if __name__ == "__main__":
    main()
