"""int8 against fp32, end to end: the default job on the sample with each model.

    python scripts/bench_int8.py [--int8 DIR] [--repeats 3] [--streams 2] [--out bench_out/int8.json]

Without --int8 the default model is quantised (`python -m pipeline quantize`, calibrated and
gated on data/sample, default settings) into .cache/models/<name>-int8 unless that directory
already holds a model quantised from the current default model. Then the default job runs on
data/sample with the fp32 and the int8 model in alternation (a fresh process each, as a user
runs it), --repeats times each. Prints a table (medians) with rows/s, the speed-up, both models'
metrics, the largest score difference between the two runs' predictions, and the int8 model's
recorded gate; writes JSON. The issue's target is 1.6x the fp32 rows/s within the 1% gate.

    python scripts/bench_int8.py --model-stage SPEC... [--threads 1 2] [--isa native AVX2] [--repeats 9]

times the model stage alone instead: one 32 x 128 batch of random ids per `PaddlePredictor.run`
(as scripts/bench_predictor.py), warm predictors, the SPECs in alternation within each repeat
(so the VM's drift hits all alike), medians. A SPEC is a model directory, optionally with a
precision: DIR (its own: fp32 or int8), DIR:bf16 (an fp32 model on oneDNN's bf16 kernels, as
`--precision bf16` runs it) or INT8_DIR:bf16 (mixed: the int8 model's Linears int8 and every
other op oneDNN has a bf16 kernel for in bf16, `enable_mkldnn_int8` + `enable_mkldnn_bfloat16`).
Each --isa runs in its own process with ONEDNN_MAX_CPU_ISA set before paddle loads (native:
unset; AVX2 makes oneDNN behave as on an AVX2-only CPU: no VNNI, AMX or bf16 kernels, where a
bf16 SPEC silently runs fp32 and is skipped). Prints ms per batch and the speed-up over the
first SPEC; writes JSON (--out, default WORKDIR/int8-model-stage.json).
"""

from __future__ import annotations

import argparse
import csv
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
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

from common import timed_run  # noqa: E402
from pipeline.config import DEFAULT_INPUT  # noqa: E402


def predictions(out: Path) -> dict[tuple[str, str], float]:
    with open(out / "predictions.tsv", encoding="utf-8", newline="") as f:
        return {(r[0], r[1]): float(r[2]) for r in csv.reader(f, delimiter="\t")}


BATCH, SEQ = 32, 128


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """'DIR' or 'DIR:bf16' -> (DIR, 'bf16' or None)."""
    head, _, tail = spec.rpartition(":")
    return (Path(head), tail) if head and tail == "bf16" else (Path(spec), None)


def _predictor(model_dir: Path, bf16: str | None, threads: int):
    """A `PaddlePredictor` as `run` builds it; with bf16 on an int8 model the int8 config plus
    `enable_mkldnn_bfloat16()` (mixed), which the engine does not build."""
    from pipeline.engine import predictor as P
    from pipeline.engine.modeldir import load_model_info

    info = load_model_info(model_dir)
    if bf16 and info.precision == "int8":
        build = P.build_config

        def mixed(info_, settings):
            config = build(info_, settings)
            config.enable_mkldnn_bfloat16()
            return config

        P.build_config = mixed
        try:
            return P.PaddlePredictor(info, P.PredictorSettings(threads=threads)), info
        finally:
            P.build_config = build
    return P.PaddlePredictor(info, P.PredictorSettings(threads=threads, precision=bf16 or "fp32")), info


def model_stage_worker(specs: list[str], threads: list[int], repeats: int) -> dict:
    """In this process (ONEDNN_MAX_CPU_ISA already set): ms per 32 x 128 batch of each spec."""
    import zlib  # noqa: F401 - before paddle

    import numpy as np

    from pipeline.engine.cpu import CpuFeatures  # the engine's view of the CPU (bf16 kernels or not)

    cpu = CpuFeatures.detect()
    out = {"isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"), "cpu": cpu.to_dict(), "results": {}}
    for t in threads:
        runs = []
        for spec in specs:
            path, bf16 = parse_spec(spec)
            if bf16 and not getattr(cpu, "bf16", False):
                print(f"  {spec}: skipped, this CPU (as oneDNN sees it) has no bf16 kernels", file=sys.stderr)
                continue
            pred, info = _predictor(path, bf16, t)
            rng = np.random.default_rng(0)
            ids = rng.integers(1000, min(info.vocab_size, 30000), size=(BATCH, SEQ)).astype(np.int64)
            ids[:, 0] = 101
            feed = (ids, np.zeros_like(ids), np.ones((BATCH, SEQ), np.float32))
            for _ in range(2):
                pred.run(*feed)  # oneDNN primitives for this shape
            runs.append((spec, pred, feed))
        times = {spec: [] for spec, _, _ in runs}
        for _ in range(repeats):
            for spec, pred, feed in runs:
                t0 = time.perf_counter()
                pred.run(*feed)
                times[spec].append(time.perf_counter() - t0)
        out["results"][str(t)] = {spec: {"ms_median": 1e3 * statistics.median(ts), "ms_min": 1e3 * min(ts)}
                                  for spec, ts in times.items()}
        del runs
    return out


def model_stage(args) -> int:
    results = []
    for isa in args.isa:
        env = dict(os.environ)
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        if isa != "native":
            env["ONEDNN_MAX_CPU_ISA"] = isa
        cmd = [sys.executable, __file__, "--model-stage-worker", json.dumps(
            {"specs": args.model_stage, "threads": args.threads, "repeats": args.repeats})]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        sys.stderr.write(proc.stderr[-2000:] if proc.returncode else "")
    report = {"batch": [BATCH, SEQ], "repeats": args.repeats, "specs": args.model_stage,
              "cpu": platform.processor() or platform.machine(), "runs": results}
    out = args.out or args.workdir / "int8-model-stage.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    ref = args.model_stage[0]
    print(f"model stage, {BATCH} x {SEQ} batch, medians of {args.repeats}; speed-up over {ref}")
    print(f"{'isa':<7} {'threads':>7}  {'spec':<58} {'ms/batch':>9} {'(min)':>7} {'x':>6}")
    for r in results:
        for t, per in r["results"].items():
            base = per.get(ref, {}).get("ms_median")
            for spec, m in per.items():
                x = f"{base / m['ms_median']:.2f}" if base else "-"
                print(f"{r['isa']:<7} {t:>7}  {spec[-58:]:<58} {m['ms_median']:9.1f} {m['ms_min']:7.1f} {x:>6}")
    print(f"JSON: {out}")
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--model-stage-worker":
        cfg = json.loads(sys.argv[2])
        print(json.dumps(model_stage_worker(cfg["specs"], cfg["threads"], cfg["repeats"])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-stage", nargs="+", default=None, metavar="SPEC",
                    help="time the model stage of these specs (DIR, DIR:bf16) instead of the end-to-end job")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="--model-stage: thread counts")
    ap.add_argument("--isa", nargs="+", default=["native", "AVX2"],
                    help="--model-stage: ONEDNN_MAX_CPU_ISA values, 'native' for unset")
    ap.add_argument("--int8", type=Path, default=None, help="int8 model directory (default: quantise into the cache)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, default=None, help="--streams of the runs (default: the run's default)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: WORKDIR/int8.json)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model_stage:
        args.repeats = args.repeats if args.repeats != 3 else 9
        return model_stage(args)

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
            # the precision explicit: `--precision auto` would run the fp32 model bf16 on a CPU with bf16 kernels
            r = timed_run([DEFAULT_INPUT], args.workdir / f"int8-run-{label}",
                          ["--model", str(model.path), "--precision", label, *extra])
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
