"""Cost of `--tsv-quoting auto`: the whole-file scan against reading the file.

    python scripts/bench_tsv_quoting.py [--mb 500] [--quoted-mb 500] [--workdir /tmp/bench_tsv_quoting]
                                        [--keep] [--json bench_out/tsv_quoting.json]

Writes two pair files (qid, query, doc_id, doc, label) of about --mb / --quoted-mb MB each:

- `raw.tsv`, MS MARCO style: passages of 40-75 words, raw text (quotes are text), about 12% of
  them with a quotation inside, 3% opening with one (`"Hello" he said ...`), 1% with an
  unbalanced quote;
- `pandas.tsv`: the same kind of rows written by `pandas.DataFrame.to_csv(sep="\\t")` (fields
  holding a quote are quoted, their quotes doubled), 1% of the passages with a line break.

For each file: the scan alone (`decide_tsv_quoting(path, "auto")`), and reading it alone
(`DatasetReader(path, tsv_quoting=<the mode auto picks>)`: build + every chunk, as a run reads
it). `auto` costs the scan plus that same read: `DatasetReader(path)` (auto) runs the scan when
it is built, then reads through the same code. Prints a table (and the CPU) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.io.formats import decide_tsv_quoting  # noqa: E402
from pipeline.io.reader import DatasetReader  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his an were are which this be has had it "
         "not or have its first also their new after one two who but all they been more other than when "
         "time during most only over some into world city year state known used between under later "
         "called school several part since three high where found number however many these both such "
         "people national including until while first each well large early water area often made "
         "population river system company century season university american government united series").split()


def cpu() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(), "cores": os.cpu_count()}


def passage(rng: random.Random, line_breaks: bool) -> str:
    words = rng.choices(WORDS, k=rng.randint(40, 75))
    r = rng.random()
    if r < 0.12:  # a quotation inside
        i = rng.randrange(5, len(words) - 6)
        words[i] = '"' + words[i]
        words[i + 3] += '"'
    elif r < 0.15:  # opens with a quotation
        words[0] = '"' + words[0].capitalize()
        words[1] += '"'
    elif r < 0.16:  # unbalanced: a snippet cut inside a quotation
        words[rng.randrange(len(words))] += '"'
    text = " ".join(words) + "."
    if line_breaks and rng.random() < 0.01:
        text = text.replace(" was ", " was\n", 1)
    return text


def rows(rng: random.Random, target: int, line_breaks: bool):
    """Batches of rows (lists), about `target` bytes in all; 30 candidates per query."""
    written, i = 0, 0
    while written < target:
        batch = []
        for _ in range(20_000):
            q = i // 30
            doc = passage(rng, line_breaks)
            batch.append((f"q{q}", f"what is {WORDS[q % len(WORDS)]} {WORDS[(q * 7) % len(WORDS)]}", f"d{i}", doc,
                          i % 3))
            written += len(doc) + 40
            i += 1
        yield batch


def write_raw(path: Path, mb: float) -> None:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("qid\tquery\tdoc_id\tdoc\tlabel\n")
        for batch in rows(rng, int(mb * 1e6), line_breaks=False):
            f.write("".join(f"{a}\t{b}\t{c}\t{d}\t{e}\n" for a, b, c, d, e in batch))


def write_pandas(path: Path, mb: float) -> None:
    import pandas as pd

    rng = random.Random(1)
    with open(path, "w", encoding="utf-8", newline="") as f:
        for n, batch in enumerate(rows(rng, int(mb * 1e6), line_breaks=True)):
            df = pd.DataFrame(batch, columns=["qid", "query", "doc_id", "doc", "label"])
            df.to_csv(f, sep="\t", index=False, header=n == 0, lineterminator="\n")


def stats(path: Path) -> dict:
    lines = quoted = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            lines += block.count(b"\n")
    with open(path, "rb") as f:
        quoted = sum(1 for raw in f if b'"' in raw)
    return {"mb": round(path.stat().st_size / 1e6, 1), "lines": lines, "lines_with_a_quote": quoted}


def read_all(path: Path, mode: str) -> tuple[float, int, int]:
    t = time.perf_counter()
    reader = DatasetReader([path], tsv_quoting=mode)
    accepted = rejected = 0
    for chunk, rejects in reader.chunks():
        accepted += len(chunk) if chunk is not None else 0
        rejected += len(rejects)
    return time.perf_counter() - t, accepted, rejected


def measure(path: Path) -> dict:
    t = time.perf_counter()
    mode, rule = decide_tsv_quoting(path, "auto")
    scan = time.perf_counter() - t
    read, accepted, rejected = read_all(path, mode)
    size = path.stat().st_size / 1e6
    return {"file": path.name, **stats(path), "mode": mode, "rule": rule, "scan_s": round(scan, 2),
            "read_s": round(read, 2), "auto_s": round(scan + read, 2),
            "scan_mb_per_s": round(size / scan, 1), "read_mb_per_s": round(size / read, 1),
            "overhead_pct": round(100 * scan / read, 1), "rows": accepted, "rejected": rejected}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=500, help="size of the raw MS MARCO style file (MB)")
    ap.add_argument("--quoted-mb", type=float, default=None, help="size of the pandas-written file (default: --mb)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_tsv_quoting"))
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--json", type=Path, default=ROOT / "bench_out" / "tsv_quoting.json")
    args = ap.parse_args()
    quoted_mb = args.mb if args.quoted_mb is None else args.quoted_mb

    machine = {**cpu(), "python": platform.python_version(), "load_before": round(os.getloadavg()[0], 2)}
    print(f"CPU: {machine['model']}, {machine['cores']} cores; load {machine['load_before']}", flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    raw, quoted = args.workdir / "raw.tsv", args.workdir / "pandas.tsv"
    t = time.perf_counter()
    write_raw(raw, args.mb)
    write_pandas(quoted, quoted_mb)
    print(f"wrote {raw} and {quoted} in {time.perf_counter() - t:.0f} s", flush=True)
    try:
        results = []
        for path in (raw, quoted):
            results.append(measure(path))
            print(f"  {path.name}: {results[-1]['rule']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    machine["load_after"] = round(os.getloadavg()[0], 2)

    head = ("| file | MB | lines | lines with a quote | auto picks | scan s | read s | auto (scan + read) s "
            "| scan MB/s | read MB/s | scan / read |")
    print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
    for r in results:
        print(f"| {r['file']} | {r['mb']} | {r['lines']:,} | {r['lines_with_a_quote']:,} "
              f"({100 * r['lines_with_a_quote'] / r['lines']:.1f}%) | {r['mode']} | {r['scan_s']} | {r['read_s']} "
              f"| {r['auto_s']} | {r['scan_mb_per_s']} | {r['read_mb_per_s']} | {r['overhead_pct']}% |")
    print(f"\nread = DatasetReader build + every chunk in the mode auto picks; CPU {machine['model']}, "
          f"{machine['cores']} cores, load {machine['load_before']} -> {machine['load_after']}")
    report = {"benchmark": "tsv_quoting", "machine": machine, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
