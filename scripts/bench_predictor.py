"""The model stage alone against the machine's fp32 GEMM peak: 32 x 128 batches, warm predictor.

    python scripts/bench_predictor.py [MODEL_DIR ...] [--threads 1] [--repeats 15] [--json out.json]

For each model directory (default: the converted default model) it times `PaddlePredictor.run`
on one 32 x 128 batch of random token ids (no padding, like ../shared/peer-figures.md "W1"),
after a warm-up, and reports tokens/s, achieved GFLOP/s and the share of the single-core fp32
GEMM peak, which it measures in a subprocess with one thread (numpy sgemm on 2048 x 2048
matrices, best of 5; that is the roofline the peers are compared on). This machine is a VM whose
speed drifts by 10-20% over minutes, so the peak is measured between rounds (every third) and
its median used, and model directories are timed in alternation, so drift hits all alike. With --threads N the
percentage is of N times the single-core peak.

FLOPs per token count the matrix products only (2 multiply-adds per weight for the Linear
layers, QK^T and attention x V at the batch's sequence length), as the peer figures do.
"""

from __future__ import annotations

import zlib  # noqa: F401 - before paddle (see pipeline/engine/predictor.py)

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH, SEQ = 32, 128
PEAK_SNIPPET = """
import time, numpy as np
n = 2048
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
a @ b
best = min((lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(5))
print(2 * n ** 3 / best / 1e9)
"""


def single_core_peak_gflops() -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PEAK_SNIPPET], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def flops_per_token(info, seq: int) -> float:
    c = info.architecture
    h, f, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    linear = 2 * (4 * h * h + 2 * h * f)  # QKV + attention out + the two FFN Linears
    attention = 2 * 2 * seq * h  # QK^T and attention x V
    return layers * (linear + attention)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np

    from pipeline.engine.modeldir import load_model_info
    from pipeline.engine.predictor import PaddlePredictor, PredictorSettings

    if not args.models:
        from pipeline.cli import default_model

        args.models = [default_model().path]
    infos = [load_model_info(m) for m in args.models]
    rng = np.random.default_rng(0)
    preds, feeds = [], []
    for info in infos:
        preds.append(PaddlePredictor(info, PredictorSettings(threads=args.threads)))
        ids = rng.integers(1000, min(info.vocab_size, 30000), size=(BATCH, SEQ)).astype(np.int64)
        ids[:, 0] = 101
        feeds.append((ids, np.zeros_like(ids), np.ones((BATCH, SEQ), np.float32)))
    for p, f in zip(preds, feeds):
        for _ in range(2):
            p.run(*f)  # oneDNN primitives for this shape
    times: list[list[float]] = [[] for _ in infos]
    peaks = []
    for i in range(args.repeats):
        if i % 3 == 0:
            peaks.append(single_core_peak_gflops())
        for k, (p, f) in enumerate(zip(preds, feeds)):
            t0 = time.perf_counter()
            p.run(*f)
            times[k].append(time.perf_counter() - t0)

    peaks.append(single_core_peak_gflops())
    peak = statistics.median(peaks)
    results = []
    for info, ts in zip(infos, times):
        med = statistics.median(ts)
        tok_s = BATCH * SEQ / med
        gflops = tok_s * flops_per_token(info, SEQ) / 1e9
        results.append({"model": str(info.path), "ms_per_batch_median": 1e3 * med, "ms_per_batch_min": 1e3 * min(ts),
                        "tokens_per_second": tok_s, "gflops": gflops,
                        "percent_of_peak": 100 * gflops / (peak * args.threads),
                        "flops_per_token": flops_per_token(info, SEQ)})
    report = {"batch": [BATCH, SEQ], "threads": args.threads, "repeats": args.repeats,
              "single_core_peak_gflops": peak, "single_core_peak_gflops_samples": peaks, "results": results,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}}
    print(f"single-core fp32 GEMM peak {peak:.1f} GFLOP/s (median of {len(peaks)}: "
          f"{', '.join(f'{x:.0f}' for x in peaks)}); batch {BATCH} x {SEQ}, {args.threads} thread(s), "
          f"medians of {args.repeats}")
    print(f"{'model':<48} {'ms/batch':>9} {'(min)':>7} {'tokens/s':>9} {'GFLOP/s':>8} {'% peak':>7}")
    for r in results:
        print(f"{r['model'][-48:]:<48} {r['ms_per_batch_median']:9.1f} {r['ms_per_batch_min']:7.1f} "
              f"{r['tokens_per_second']:9.0f} {r['gflops']:8.1f} {r['percent_of_peak']:6.1f}%")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
