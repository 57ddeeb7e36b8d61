"""Peak resident memory of whole runs at growing input sizes (issue 4: bounded memory).

    python scripts/bench_memory.py [--sizes 200000 2000000] [--queries 5000000] [--mode bi|cross]
                                   [--out bench_out/memory.json]

Generates a synthetic pair file per case, runs `python -m pipeline run` on it in a fresh process
with a small random model (the memory that matters here is the pipeline's, not the model's),
and records the peak RSS of the pipeline process and of its tokenizer workers (ru_maxrss of the
largest). Texts are 6-14 words drawn from the sample's vocabulary, so every document text is
distinct. Two kinds of case:

- `--sizes N...`: N pairs, 30 candidates per query (default 200k and 2M pairs). The target:
  peak RSS at the largest size within 25% of the smallest.
- `--queries N...`: N queries of 1 or 2 candidates each (about 1.5 N pairs; none by default).
  This is where per-query state and the final ranking's bucket count (one bucket per 4,096
  queries: 1,221 at 5M queries, more than the usual limit of 1,024 open files) show; its peak
  RSS is reported beside the smallest `--sizes` case, without a target. 5M queries is about
  7.5M pairs: expect tens of minutes and ~1 GB of data under --workdir.

Prints a table and writes JSON.
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


def _words() -> list[str]:
    with open(DEFAULT_INPUT / "pairs.tsv", encoding="utf-8", newline="") as f:
        return sorted({w for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                       for w in r["doc"].split() if w.isalpha()})


def make_data(path: Path, pairs: int, seed: int = 0) -> None:
    """`pairs` rows, 30 candidates per query."""
    words, rng = _words(), random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("qid\tquery\tdoc_id\tdoc\tlabel\n")
        query = ""
        for i in range(pairs):
            if i % 30 == 0:
                query = " ".join(rng.choices(words, k=rng.randint(4, 8)))
            doc = " ".join(rng.choices(words, k=rng.randint(6, 14)))
            f.write(f"q{i // 30}\t{query}\td{i}\t{doc}\t{rng.randint(0, 2)}\n")


def make_query_data(path: Path, queries: int, seed: int = 0) -> int:
    """`queries` queries of 1 or 2 candidates each; returns the number of pairs."""
    words, rng = _words(), random.Random(seed)
    pairs = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("qid\tquery\tdoc_id\tdoc\tlabel\n")
        for q in range(queries):
            query = " ".join(rng.choices(words, k=rng.randint(4, 8)))
            lines = []
            for _ in range(rng.randint(1, 2)):
                doc = " ".join(rng.choices(words, k=rng.randint(6, 14)))
                lines.append(f"q{q}\t{query}\td{pairs}\t{doc}\t{rng.randint(0, 2)}\n")
                pairs += 1
            f.write("".join(lines))
    return pairs


def make_model(folder: Path, mode: str) -> Path:
    from pipeline.convert import convert
    from tests.conftest import write_hf_checkpoint

    dst = folder / f"tiny-{mode}"
    if not dst.exists():
        src = write_hf_checkpoint(folder / f"ckpt-{mode}", default_model_source() / "vocab.txt",
                                  num_labels=1 if mode == "cross" else 0)
        convert(src, dst, name=f"tiny-{mode}")
    return dst


def measure(data: Path, model: Path, out: Path) -> dict:
    """One `python -m pipeline run` in a fresh process: its peak RSS, wall time and report."""
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "pipeline", "run", str(data), "--model",
           str(model), "--out", str(out), "--no-progress", "--restart"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    maxrss_kb, seconds, rc = res.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"run on {data} failed (exit {rc}):\n{res.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"peak_rss_mb": int(maxrss_kb) / 1024, "seconds": float(seconds), "rows": report["rows"],
            "rows_per_second": report["rows_per_second"]}


def run_case(kind: str, n: int, model: Path, args) -> dict:
    data = args.workdir / f"{kind}-{n}.tsv"
    t0 = time.perf_counter()
    if kind == "pairs":
        if not data.exists():
            make_data(data, n)
        case = {"pairs": n, "queries": -(-n // 30)}
    else:
        if data.exists():
            with open(data, "rb") as f:
                pairs = sum(1 for _ in f) - 1
        else:
            pairs = make_query_data(data, n)
        case = {"pairs": pairs, "queries": n}
    print(f"{kind} {n}: data ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    case.update(kind=kind, **measure(data, model, args.workdir / f"out-{kind}-{n}"))
    print(f"{kind} {n}: peak RSS {case['peak_rss_mb']:.0f} MB, {case['seconds']:.0f} s", file=sys.stderr)
    if not args.keep_data:
        data.unlink()
    return case


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[200_000, 2_000_000],
                    help="pairs, 30 candidates per query (default: 200000 2000000)")
    ap.add_argument("--queries", type=int, nargs="*", default=[],
                    help="queries of 1-2 candidates each, e.g. 5000000 (default: none)")
    ap.add_argument("--mode", choices=["bi", "cross"], default="bi")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "memory")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "memory.json")
    ap.add_argument("--keep-data", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    if not args.sizes and not args.queries:
        ap.error("nothing to measure: give --sizes and/or --queries")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = make_model(args.workdir, args.mode)
    results = [run_case("pairs", n, model, args) for n in args.sizes]
    results += [run_case("queries", n, model, args) for n in args.queries]
    sized = [r for r in results if r["kind"] == "pairs"]
    growth = sized[-1]["peak_rss_mb"] / sized[0]["peak_rss_mb"] - 1 if sized else None
    for r in results:
        r["vs_smallest"] = r["peak_rss_mb"] / sized[0]["peak_rss_mb"] - 1 if sized else None
    summary = {"mode": args.mode, "model": str(model), "results": results, "growth": growth,
               "target": "growth < 0.25 (--sizes cases)", "met": growth is not None and growth < 0.25}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'case':>16}  {'pairs':>10}  {'queries':>9}  {'peak RSS MB':>11}  {'vs first':>8}  {'seconds':>8}  "
          f"{'rows/s':>8}")
    for r in results:
        vs = f"{100 * r['vs_smallest']:+.1f}%" if r["vs_smallest"] is not None else "-"
        print(f"{r['kind'] + ' ' + str(r['queries' if r['kind'] == 'queries' else 'pairs']):>16}  {r['pairs']:>10}  "
              f"{r['queries']:>9}  {r['peak_rss_mb']:>11.0f}  {vs:>8}  {r['seconds']:>8.0f}  {r['rows_per_second']:>8.0f}")
    if growth is not None:
        print(f"growth {100 * growth:+.1f}% (target < 25%): {'met' if growth < 0.25 else 'NOT met'}; JSON: {args.out}")
    else:
        print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
