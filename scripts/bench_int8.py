"""int8 against fp32, end to end: the default job on the sample with each model.

    python scripts/bench_int8.py [--int8 DIR] [--repeats 3] [--streams 2] [--out bench_out/int8.json]

Without --int8 the default model is quantised (`python -m pipeline quantize`, calibrated and
gated on data/sample, default settings) into .cache/models/<name>-int8 unless that directory
already holds a model quantised from the current default model. Then the default job runs on
data/sample with the fp32 and the int8 model in alternation (a fresh process each, as a user
runs it), --repeats times each. Prints a table (medians) with rows/s, the speed-up, both models'
metrics, the largest score difference between the two runs' predictions, and the int8 model's
recorded gate; writes JSON. The issue's target is 1.6x the fp32 rows/s within the 1% gate.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

from common import timed_run  # noqa: E402
from pipeline.config import DEFAULT_INPUT  # noqa: E402


def predictions(out: Path) -> dict[tuple[str, str], float]:
    with open(out / "predictions.tsv", encoding="utf-8", newline="") as f:
        return {(r[0], r[1]): float(r[2]) for r in csv.reader(f, delimiter="\t")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--int8", type=Path, default=None, help="int8 model directory (default: quantise into the cache)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, default=None, help="--streams of the runs (default: the run's default)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: WORKDIR/int8.json)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    from pipeline.cli import default_model
    from pipeline.engine.modeldir import ModelDirError, load_model_info

    fp32 = default_model()
    int8_dir = args.int8 or fp32.path.parent / f"{fp32.name}-int8"
    try:
        q = load_model_info(int8_dir).quantization
        current = q is not None and q.source_params_sha256 == fp32.checksum
    except ModelDirError:
        current = False
    if args.int8 is None and not current:
        subprocess.run([sys.executable, "-m", "pipeline", "quantize", str(fp32.path), "--calib", str(DEFAULT_INPUT),
                        "--out", str(int8_dir), "--force"], cwd=ROOT, check=True)
    int8 = load_model_info(int8_dir)

    extra = [] if args.streams is None else ["--streams", str(args.streams)]
    runs: dict[str, list[dict]] = {"fp32": [], "int8": []}
    for i in range(args.repeats):
        for label, model in (("fp32", fp32), ("int8", int8)):
            r = timed_run([DEFAULT_INPUT], args.workdir / f"int8-run-{label}", ["--model", str(model.path), *extra])
            runs[label].append(r)
            print(f"{label} run {i + 1}: total {r['report']['seconds']['total']:.2f} s", file=sys.stderr)
    a, b = predictions(args.workdir / "int8-run-fp32"), predictions(args.workdir / "int8-run-int8")
    assert a.keys() == b.keys(), "both runs must score the same rows"
    max_diff = max(abs(a[k] - b[k]) for k in a)

    summary = {}
    for label, rs in runs.items():
        rep = rs[-1]["report"]
        total = statistics.median(r["report"]["seconds"]["total"] for r in rs)
        summary[label] = {"total_seconds_median": total, "total_seconds": [r["report"]["seconds"]["total"] for r in rs],
                          "rows_per_second": rep["rows"]["scored"] / total, "metrics": rep["metrics"],
                          "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in rs)}
    speedup = summary["int8"]["rows_per_second"] / summary["fp32"]["rows_per_second"]
    assert int8.quantization is not None, f"{int8.path} is not a quantised model"
    gate = int8.quantization.record["gate"]
    result = {"input": str(DEFAULT_INPUT), "repeats": args.repeats, "fp32_model": str(fp32.path),
              "int8_model": str(int8.path), "int8_linears": list(int8.quantization.int8_linears),
              "runs": summary, "speedup_rows_per_second": speedup, "max_abs_score_diff": max_diff, "gate": gate}
    out = args.out or args.workdir / "int8.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'model':<6} {'total s':>8} {'rows/s':>8} {'NDCG@10':>8} {'PNR':>7} {'peak RSS MB':>12}")
    for label, s in summary.items():
        m = s["metrics"]
        print(f"{label:<6} {s['total_seconds_median']:8.2f} {s['rows_per_second']:8.1f} {m['ndcg_at_10']:8.4f} "
              f"{m['pnr']:7.3f} {s['peak_rss_mb_median']:12.0f}")
    print(f"int8 / fp32 rows/s: {speedup:.2f}x (target 1.6x); int8 Linears: {', '.join(result['int8_linears'] or [])}")
    print(f"max |score fp32 - score int8| on the sample: {max_diff:.4g}; gate (held-out half): "
          f"NDCG@10 loss {100 * gate['loss_rate']['ndcg_at_10']:.2f}%, PNR loss {100 * gate['loss_rate']['pnr']:.2f}%, "
          f"{'passed' if gate['passed'] else 'FAILED'}")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
