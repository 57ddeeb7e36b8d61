"""Peak resident memory of whole runs at growing input sizes (issue 4: bounded memory).

    python scripts/bench_memory.py [--sizes 200000 2000000] [--mode bi|cross] [--out bench_out/memory.json]

Generates a synthetic pair file per size (30 candidates per query, texts of 6-14 words drawn
from the sample's vocabulary, so every document text is distinct), runs
`python -m pipeline run` on it in a fresh process with a small random model (the memory that
matters here is the pipeline's, not the model's), and records the peak RSS of the pipeline
process (ru_maxrss) and of its tokenizer workers. The target: peak RSS at the largest size
within 25% of the smallest. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import DEFAULT_INPUT, default_model_source  # noqa: E402

MEASURE = """
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t, rc)
"""


def make_data(path: Path, pairs: int, seed: int = 0) -> None:
    with open(DEFAULT_INPUT / "pairs.tsv", encoding="utf-8", newline="") as f:
        words = sorted({w for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                        for w in r["doc"].split() if w.isalpha()})
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("qid\tquery\tdoc_id\tdoc\tlabel\n")
        query = ""
        for i in range(pairs):
            if i % 30 == 0:
                query = " ".join(rng.choices(words, k=rng.randint(4, 8)))
            doc = " ".join(rng.choices(words, k=rng.randint(6, 14)))
            f.write(f"q{i // 30}\t{query}\td{i}\t{doc}\t{rng.randint(0, 2)}\n")


def make_model(folder: Path, mode: str) -> Path:
    from pipeline.convert import convert
    from tests.conftest import write_hf_checkpoint

    dst = folder / f"tiny-{mode}"
    if not dst.exists():
        src = write_hf_checkpoint(folder / f"ckpt-{mode}", default_model_source() / "vocab.txt",
                                  num_labels=1 if mode == "cross" else 0)
        convert(src, dst, name=f"tiny-{mode}")
    return dst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200_000, 2_000_000])
    ap.add_argument("--mode", choices=["bi", "cross"], default="bi")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "memory")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "memory.json")
    ap.add_argument("--keep-data", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = make_model(args.workdir, args.mode)
    results = []
    for n in args.sizes:
        data = args.workdir / f"pairs-{n}.tsv"
        if not data.exists():
            t0 = time.perf_counter()
            make_data(data, n)
            print(f"generated {n} pairs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        out = args.workdir / f"out-{n}"
        cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "pipeline", "run", str(data), "--model",
               str(model), "--out", str(out), "--no-progress", "--restart"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        maxrss_kb, seconds, rc = res.stdout.split()
        if int(rc) != 0:
            raise SystemExit(f"run on {n} pairs failed (exit {rc})")
        report = json.loads((out / "report.json").read_text())
        results.append({"pairs": n, "peak_rss_mb": int(maxrss_kb) / 1024, "seconds": float(seconds),
                        "rows": report["rows"], "rows_per_second": report["rows_per_second"]})
        print(f"{n} pairs: peak RSS {int(maxrss_kb) / 1024:.0f} MB, {float(seconds):.0f} s", file=sys.stderr)
        if not args.keep_data:
            data.unlink()
    base, top = results[0]["peak_rss_mb"], results[-1]["peak_rss_mb"]
    growth = top / base - 1
    summary = {"mode": args.mode, "model": str(model), "results": results, "growth": growth,
               "target": "growth < 0.25", "met": growth < 0.25}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'pairs':>10}  {'peak RSS MB':>11}  {'seconds':>8}  {'rows/s':>8}")
    for r in results:
        print(f"{r['pairs']:>10}  {r['peak_rss_mb']:>11.0f}  {r['seconds']:>8.0f}  {r['rows_per_second']:>8.0f}")
    print(f"growth {100 * growth:+.1f}% (target < 25%): {'met' if growth < 0.25 else 'NOT met'}; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
