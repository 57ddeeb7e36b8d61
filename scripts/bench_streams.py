"""Threads or streams: one predictor with N math threads vs N single-thread predictors.

    python scripts/bench_streams.py [--pairs 18000] [--repeats 3] [--configs 2x1,1x2] [--busy 0,1]

Runs the default job (`python -m pipeline run`, a fresh process each time, as a user runs it) on
the sample replicated to about --pairs pairs, for each configuration STREAMSxTHREADS_PER_STREAM
("1x2": one predictor with 2 math threads; "2x1": two single-thread predictors running batches
at once, `--streams 2`). With --busy 1 the runs share the machine
with one busy-looping process (another job on the box), which is where a multi-threaded
predictor loses most: every op waits for its slowest thread. Configurations alternate within
each repeat so drift hits them alike. Prints a table (medians) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

from bench_pipeline import build_dataset  # noqa: E402
from common import timed_run  # noqa: E402
from pipeline.config import cpu_count  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=18000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default="1x2,2x1", help="STREAMSxTHREADS_PER_STREAM, comma-separated")
    ap.add_argument("--busy", default="0,1", help="competing busy processes, comma-separated")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: WORKDIR/streams.json)")
    args = ap.parse_args()
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    loads = [int(b) for b in args.busy.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / "bench_pairs.tsv"
    n_pairs, texts = build_dataset(data, args.pairs)

    from pipeline.cli import default_model

    default_model()  # converts into the cache if needed, outside the timed runs
    runs: dict[tuple, list[dict]] = {(b, c): [] for b in loads for c in configs}
    for busy in loads:
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            for i in range(args.repeats):
                for streams, tps in configs:
                    r = timed_run([data], args.workdir / "streams-run",
                                  ["--streams", str(streams), "--threads", str(streams * tps)])
                    runs[(busy, (streams, tps))].append(r)
                    print(f"busy {busy} {streams}x{tps} run {i + 1}: total {r['report']['seconds']['total']:.2f} s, "
                          f"peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr)
        finally:
            for h in hogs:
                h.kill()
                h.wait()

    table = []
    scores = {}
    for (busy, (streams, tps)), rs in runs.items():
        total = statistics.median(r["report"]["seconds"]["total"] for r in rs)
        rep = rs[-1]["report"]
        scores[(busy, streams, tps)] = rep["metrics"]
        table.append({
            "busy_processes": busy, "streams": streams, "threads_per_stream": tps,
            "total_seconds_median": total, "total_seconds": [r["report"]["seconds"]["total"] for r in rs],
            "infer_seconds_median": statistics.median(r["report"]["seconds"]["infer"] for r in rs),
            "rows_per_second": n_pairs / total,
            "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in rs),
            "metrics": rep["metrics"],
        })
    result = {
        "pairs": n_pairs, "distinct_texts": len(texts), "repeats": args.repeats, "runs": table,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cpu_count(),
                    "python": platform.python_version()},
    }
    out = args.out or args.workdir / "streams.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{n_pairs} pairs, {len(texts)} distinct texts, medians of {args.repeats}")
    print(f"{'busy':>4}  {'streams x threads':>17}  {'total s':>8}  {'rows/s':>7}  {'infer s':>8}  {'peak RSS MB':>11}  NDCG@10")
    for t in table:
        print(f"{t['busy_processes']:>4}  {t['streams']:>9} x {t['threads_per_stream']:<5}  {t['total_seconds_median']:8.2f}  "
              f"{t['rows_per_second']:7.0f}  {t['infer_seconds_median']:8.2f}  {t['peak_rss_mb_median']:11.0f}  "
              f"{t['metrics'].get('ndcg_at_10', float('nan')):.4f}")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
