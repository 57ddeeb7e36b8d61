"""Benchmark the main job end to end against the predictor alone on the same batches.

    python scripts/bench_pipeline.py [--pairs 20000] [--repeats 3] [--out bench_out/pipeline.json]

1. Builds a dataset of about --pairs pairs by replicating data/sample (each copy's texts get a
   " (copy k)" suffix, so no copy is deduplicated away and every text is really encoded).
2. Runs the default job on it as a user does (`python -m pipeline run ...`, a fresh process)
   --repeats times and reads each run's report.json.
3. Tokenizes the same texts with the model's `TextEncoder` (untimed) and times the engine alone
   on them (`Engine.run_encoded`: the run's batches, padding and streams, same threads),
   --repeats times.
Prints a table and writes JSON. The target: the whole run takes at most 1.10x the
predictor-alone time, i.e. reading, tokenizing, batching and writing are hidden behind it.
"""

from __future__ import annotations

import zlib  # noqa: F401 - before paddle (see pipeline/engine/predictor.py)

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

from pipeline.config import DEFAULT_INPUT, STREAMS_DEFAULT, RunConfig, cpu_count  # noqa: E402


def build_dataset(path: Path, pairs: int) -> tuple[int, list[str]]:
    with open(DEFAULT_INPUT / "pairs.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    copies = max(1, round(pairs / len(rows)))
    texts: dict[str, None] = {}
    with open(path, "w", encoding="utf-8") as f:
        f.write("qid\tquery\tdoc_id\tdoc\tlabel\n")
        for k in range(copies):
            sfx = "" if k == 0 else f" (copy {k})"
            for r in rows:
                q, d = r["query"] + sfx, r["doc"] + sfx
                texts[q] = texts[d] = None
                f.write(f"{r['qid']}-{k}\t{q}\t{r['doc_id']}-{k}\t{d}\t{r['label']}\n")
    return copies * len(rows), list(texts)


def predictor_alone(model_dir: Path, texts: list[str], threads: int, streams: int, repeats: int) -> dict:
    """The same batches through the engine alone (tokenized beforehand, untimed): the run's
    default engine settings with the given threads and streams, so batches are planned, padded
    and dispatched to the streams exactly as the run does it, without reading, tokenizer
    workers or writing."""
    import numpy as np

    from pipeline.config import resolve
    from pipeline.engine.engine import Engine
    from pipeline.engine.modeldir import load_model_info
    from pipeline.engine.tokenizer import Encoded

    info = load_model_info(model_dir)
    settings = resolve(RunConfig(model=model_dir, threads=threads, streams=streams, workers=0, progress=False), info)
    with Engine(info, settings.engine) as engine:
        enc = engine.text.texts(texts, info.max_seq_len)
        # warm-up: oneDNN primitives for the first shapes, on the first `streams` planned batches
        rows = np.concatenate([b.rows for b in engine.plan(enc)[:streams]])
        engine.run_encoded(Encoded(enc.ids.take(rows), enc.types.take(rows)))
        times, stats = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            _, stats = engine.run_encoded(enc)
            times.append(time.perf_counter() - t0)
    return {"seconds": times, "median": statistics.median(times), "batches": stats.batches,
            "sequences": stats.sequences, "tokens": stats.tokens, "padded_tokens": stats.padded_tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--streams", type=int, default=None, help="default: the run's default")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: WORKDIR/pipeline.json)")
    args = ap.parse_args()
    threads = args.threads or cpu_count()
    streams = args.streams or min(STREAMS_DEFAULT, threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / "bench_pairs.tsv"
    n_pairs, texts = build_dataset(data, args.pairs)

    from pipeline.cli import default_model

    model = default_model()  # converts into the cache if needed, outside the timed runs
    runs = []
    for i in range(args.repeats):
        out = args.workdir / "run"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "run", str(data), "--out", str(out), "--no-progress",
                        "--threads", str(threads), "--streams", str(streams)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        rep = json.loads((out / "report.json").read_text())
        runs.append({"wall": wall, "report": rep})
        print(f"run {i + 1}: {wall:.2f} s wall, report total {rep['seconds']['total']:.2f} s", file=sys.stderr)
    alone = predictor_alone(model.path, texts, threads, streams, args.repeats)

    med = lambda xs: statistics.median(xs)  # noqa: E731
    wall = med([r["wall"] for r in runs])
    total = med([r["report"]["seconds"]["total"] for r in runs])
    startup = med([r["report"]["seconds"]["startup"] for r in runs])
    infer = med([r["report"]["seconds"]["infer"] for r in runs])
    rep = runs[-1]["report"]
    result = {
        "pairs": n_pairs,
        "distinct_texts": len(texts),
        "threads": threads,
        "streams": streams,
        "workers": rep["settings"]["workers"],
        "repeats": args.repeats,
        "pipeline": {
            "wall_seconds_median": wall,
            "report_total_seconds_median": total,
            "startup_seconds_median": startup,
            "infer_seconds_median": infer,
            "rows_per_second": n_pairs / total,
            "tokens_per_second": rep["tokens"]["real"] / total,
            "padding_overhead": rep["tokens"]["padding_overhead"],
            "stage_seconds_last_run": rep["seconds"],
            "metrics": rep["metrics"],
        },
        "predictor_alone": alone,
        "ratio_run_total_to_predictor_alone": total / alone["median"],
        "ratio_run_processing_to_predictor_alone": (total - startup) / alone["median"],
        "ratio_process_wall_to_predictor_alone": wall / alone["median"],
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cpu_count(),
                    "python": platform.python_version(), "MKL_DEBUG_CPU_TYPE": os.environ.get("MKL_DEBUG_CPU_TYPE")},
        "model": rep["model"],
    }
    out = args.out or args.workdir / "pipeline.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    rows = [
        ("pairs / distinct texts", f"{n_pairs} / {len(texts)}"),
        ("threads / streams / tokenizer workers", f"{threads} / {streams} / {result['workers']}"),
        ("pipeline process wall (median)", f"{wall:.2f} s"),
        ("pipeline report total (median)", f"{total:.2f} s (startup {startup:.2f} s)"),
        ("  of which predictor.run", f"{infer:.2f} s"),
        ("predictor alone (Engine.run_encoded)", f"{alone['median']:.2f} s ({alone['batches']} batches)"),
        ("rows/s, tokens/s (report total)", f"{result['pipeline']['rows_per_second']:.0f}, "
                                            f"{result['pipeline']['tokens_per_second']:.0f}"),
        ("padding overhead", f"{100 * rep['tokens']['padding_overhead']:.2f} %"),
        ("total / predictor alone", f"{result['ratio_run_total_to_predictor_alone']:.3f} (target <= 1.10)"),
        ("(total - startup) / predictor alone", f"{result['ratio_run_processing_to_predictor_alone']:.3f}"),
        ("process wall / predictor alone", f"{result['ratio_process_wall_to_predictor_alone']:.3f}"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("stage seconds (last run): " + ", ".join(f"{k} {v:.2f}" for k, v in rep["seconds"].items()))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
