"""Prove that a change left every output byte as it was: the same jobs with a base revision and
with this checkout, their outputs compared.

    python scripts/compare_outputs.py [--base REV] [--workdir DIR] [--json FILE]

REV (default e0af385, the last commit before the package redesign; any git revision works) is
checked out as a `git worktree` under --workdir and removed again at the end. Both trees run with
this checkout's `.venv` python (`python -m pipeline`, the working directory and PYTHONPATH set to
the tree, so each imports its own `pipeline`), each with its own PIPELINE_CACHE under --workdir,
so each converts the default model itself, as a fresh clone does. Cases:

- default      the default job: `run --out X --no-progress` (each tree's data/sample, the default
               bi model converted by that tree);
- cross-own    the tiny cross-encoder below, converted by each tree itself, on data/sample;
- cross        a tiny random cross-encoder (`write_hf_checkpoint` of this checkout's
               tests/conftest.py, fixed seed, the default model's vocab), converted once into a
               directory both trees read (by this checkout; by the base tree when the base cannot
               read this checkout's format), `run data/sample --model M --out Y --no-progress`;
- cross-small  the same model on a small file with bad rows (duplicate pairs, an empty query, a
               blank doc, an empty doc_id, labels that are no number or not finite) under
               `--threads 1 --workers 0 --window-rows 1000 --chunk-rows 300`, so several windows
               commit and rejects.tsv has content.

predictions.tsv, ranked.tsv, run.trec, rejects.tsv and submission.zip's predictions.tsv are
compared byte for byte; report.json on rows, tokens, metrics and the per-file counts (not
timings, versions, settings or paths; a key only one side has is listed, not counted as a
difference). Prints a table and the first differing line of every differing file, writes JSON
(default bench_out/compare_outputs.json). Exit status 0: all identical, 1: a difference, 2: a
run or the set-up failed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE = "e0af385"
BYTE_FILES = ("predictions.tsv", "ranked.tsv", "run.trec", "rejects.tsv")
ZIP_MEMBER = ("submission.zip", "predictions.tsv")
SIDES = ("base", "current")
SMALL_ROWS = 1500  # rows of data/sample in the cross-small file (windows of 1000: two windows)
SEED = 20240601

# Run in a tree: which `pipeline` it imports, and whether it reads the model directory argv[1].
PROBE = """
import json, sys
import pipeline
out = {"pipeline": pipeline.__file__}
if len(sys.argv) > 1:
    try:
        from pipeline.engine.modeldir import load_model_info
    except ImportError:
        from pipeline.modeldir import load_model_info
    try:
        load_model_info(sys.argv[1])
        out["reads_model"] = True
    except Exception as e:
        out["reads_model"] = False
        out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


class SetupError(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def git(*args: str, check: bool = True) -> str:
    p = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise SetupError(f"git {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout.strip()


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


# ----------------------------------------------------------------------------- the two trees


class Tree:
    def __init__(self, name: str, path: Path, python: Path, cache: Path, logs: Path):
        self.name, self.path, self.python, self.cache, self.logs = name, path, python, cache, logs

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(PIPELINE_CACHE=str(self.cache), PYTHONPATH=str(self.path))
        return env

    def probe(self, model: Path | None = None) -> dict:
        cmd = [str(self.python), "-c", PROBE] + ([str(model)] if model else [])
        p = subprocess.run(cmd, cwd=self.path, env=self.env(), capture_output=True, text=True)
        if p.returncode != 0:
            raise SetupError(f"{self.name} tree: probe failed:\n{p.stderr[-3000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    def pipeline(self, args: list[str], label: str) -> float:
        """`python -m pipeline ARGS` in this tree; its output goes to a log file."""
        cmd = [str(self.python), "-m", "pipeline", *args]
        self.logs.mkdir(parents=True, exist_ok=True)
        log_file = self.logs / f"{self.name}-{label}.log"
        log(f"[{self.name}] {label}: {' '.join(args)}")
        t0 = time.perf_counter()
        with open(log_file, "w") as f:
            f.write(f"$ cd {self.path} && {' '.join(cmd)}\n")
            f.flush()
            p = subprocess.run(cmd, cwd=self.path, env=self.env(), stdout=f, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
        if p.returncode != 0:
            tail = log_file.read_text(errors="replace")[-4000:]
            raise SetupError(f"{self.name} tree: `python -m pipeline {' '.join(args)}` exited {p.returncode} "
                             f"(log {log_file}):\n{tail}")
        log(f"[{self.name}] {label}: {seconds:.1f} s")
        return seconds


def add_worktree(rev: str, path: Path) -> str:
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    remove_worktree(path)
    git("worktree", "add", "--detach", str(path), commit)
    return commit


def remove_worktree(path: Path) -> None:
    if path.exists():
        git("worktree", "remove", "--force", str(path), check=False)
        shutil.rmtree(path, ignore_errors=True)
    git("worktree", "prune", check=False)


# ----------------------------------------------------------------------------- inputs


def load_conftest():
    spec = importlib.util.spec_from_file_location("_compare_conftest", ROOT / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    env = dict(os.environ)
    try:
        spec.loader.exec_module(mod)
    finally:  # it sets test-only variables (offline flags, PPNLP_HOME): the runs must not inherit them
        os.environ.clear()
        os.environ.update(env)
    return mod


def write_tiny_checkpoint(folder: Path) -> Path:
    """A random 2-layer cross-encoder checkpoint (HF layout) over the default model's vocab."""
    conftest = load_conftest()
    from pipeline.config import default_model_source

    if folder.exists():
        shutil.rmtree(folder)
    return conftest.write_hf_checkpoint(folder, default_model_source() / "vocab.txt", num_labels=1, seed=SEED)


def write_small_data(src: Path, dst: Path) -> dict:
    """The first SMALL_ROWS rows of the sample with bad rows put in (positions in the file)."""
    with open(src, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    header, rows = lines[0], [r.split("\t") for r in lines[1:SMALL_ROWS + 1] if r]
    col = {c: i for i, c in enumerate(header.split("\t"))}
    qi, di, ti = col["qid"], col["doc_id"], col["query"]

    def edited(row: list[str], **kv) -> list[str]:
        r = list(row)
        for k, v in kv.items():
            r[col[k]] = v
        return r

    bad = [  # (insert before data row k, row, what)
        (120, rows[3], "duplicate of data row 4, same window"),
        (400, edited(rows[399], query=""), "empty query"),
        (401, edited(rows[400], doc_id=rows[400][di] + "-blank", doc="   "), "blank doc"),
        (650, edited(rows[650], doc_id=""), "empty doc_id"),
        (700, edited(rows[700], doc_id=rows[700][di] + "-badlabel", label="abc"), "label not a number"),
        (701, edited(rows[701], doc_id=rows[701][di] + "-inflabel", label="inf"), "label not finite"),
        (1100, edited(rows[10], doc="another text for an earlier pair"), "duplicate of data row 11, next window"),
        (1300, edited(rows[1299], qid=rows[1299][qi], doc_id=rows[1299][di] + "-ok", query=rows[1299][ti] + " again"),
         "a good row between bad ones"),
        (1301, edited(rows[1300], label=""), "empty label"),
    ]
    out, notes = [], []
    for k, r in enumerate(rows):
        for pos, row, what in bad:
            if pos == k:
                out.append(row)
                notes.append({"file_line": len(out) + 1, "what": what})
        out.append(r)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join([header] + ["\t".join(r) for r in out]) + "\n", encoding="utf-8")
    return {"file": str(dst), "rows": len(out), "inserted": notes}


# ----------------------------------------------------------------------------- comparing


def _show(line: bytes | None, limit: int = 240) -> str | None:
    if line is None:
        return None
    s = line.decode("utf-8", errors="replace")
    return s if len(s) <= limit else s[:limit] + "..."


def first_difference(a: bytes, b: bytes) -> dict:
    la, lb = a.split(b"\n"), b.split(b"\n")
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return {"line": i + 1, "base": _show(x), "current": _show(y)}
    n = min(len(la), len(lb))
    return {"line": n + 1, "base": _show(la[n]) if n < len(la) else None,
            "current": _show(lb[n]) if n < len(lb) else None}


def compare_bytes(a: bytes | None, b: bytes | None) -> dict:
    r = {"identical": a is not None and b is not None and a == b,
         "bytes_base": None if a is None else len(a), "bytes_current": None if b is None else len(b)}
    if a is None or b is None:
        r["missing"] = [s for s, x in zip(SIDES, (a, b)) if x is None]
    elif a != b:
        r["first_difference"] = first_difference(a, b)
    return r


def read_member(zip_path: Path, member: str) -> bytes | None:
    if not zip_path.is_file():
        return None
    try:
        with zipfile.ZipFile(zip_path) as z:
            return z.read(member)
    except (KeyError, zipfile.BadZipFile):
        return None


def report_view(rep: dict) -> dict:
    """The parts of report.json that outputs determine: no timings, versions, settings or paths."""
    files = [{"file": Path(f["file"]).name, **{k: v for k, v in f.items() if k != "file"}}
             for f in rep.get("files", [])]
    return {"rows": rep.get("rows"), "tokens": rep.get("tokens"), "metrics": rep.get("metrics"), "files": files}


def dict_differences(a, b, path: str = "") -> tuple[list[str], list[str]]:
    """(differences, keys only one side has) between two JSON values."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs, extra = [], []
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                extra.append(f"{p} only in {'current' if k not in a else 'base'}")
                continue
            d, e = dict_differences(a[k], b[k], p)
            diffs += d
            extra += e
        return diffs, extra
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        diffs, extra = [], []
        for i, (x, y) in enumerate(zip(a, b)):
            d, e = dict_differences(x, y, f"{path}[{i}]")
            diffs += d
            extra += e
        return diffs, extra
    return ([] if a == b else [f"{path}: base {json.dumps(a)}, current {json.dumps(b)}"]), []


def compare_case(base_out: Path, cur_out: Path) -> dict:
    files = {name: compare_bytes(*(p.read_bytes() if p.is_file() else None for p in (base_out / name, cur_out / name)))
             for name in BYTE_FILES}
    zip_name, member = ZIP_MEMBER
    files[f"{zip_name}:{member}"] = compare_bytes(read_member(base_out / zip_name, member),
                                                  read_member(cur_out / zip_name, member))
    reps = [json.loads((d / "report.json").read_text()) if (d / "report.json").is_file() else None
            for d in (base_out, cur_out)]
    if None in reps:
        files["report.json"] = {"identical": False, "missing": [s for s, r in zip(SIDES, reps) if r is None]}
    else:
        views = [report_view(r) for r in reps]
        diffs, extra = dict_differences(*views)
        blob = [json.dumps(v, sort_keys=True).encode() for v in views]
        files["report.json"] = {"identical": not diffs, "bytes_base": len(blob[0]), "bytes_current": len(blob[1]),
                                "compared": ["rows", "tokens", "metrics", "files (counts)"]}
        if diffs:
            files["report.json"]["first_difference"] = {"key": diffs[0], "all": diffs[:20]}
        if extra:
            files["report.json"]["keys_one_side"] = extra
    return files


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--base", default=DEFAULT_BASE, help="the revision to compare this checkout against")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "compare_outputs",
                    help="worktree, model cache, converted tiny model, run outputs and logs")
    ap.add_argument("--json", type=Path, default=ROOT / "bench_out" / "compare_outputs.json", help="JSON result")
    ap.add_argument("--python", type=Path, default=None,
                    help="interpreter for both trees (default: this checkout's .venv/bin/python)")
    args = ap.parse_args()
    python = args.python or (ROOT / ".venv" / "bin" / "python")
    if not python.exists():
        python = Path(sys.executable)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    wt = work / "base-tree"
    cache, logs, outs = work / "cache", work / "logs", work / "out"

    result: dict = {"base_rev": args.base, "current": {"head": git("rev-parse", "HEAD"),
                                                        "dirty": bool(git("status", "--porcelain", "--", "pipeline"))},
                    "python": str(python), "workdir": str(work)}
    try:
        result["base_commit"] = add_worktree(args.base, wt)
        log(f"base {args.base} = {result['base_commit'][:12]} checked out in {wt}")
        trees = {"base": Tree("base", wt, python, cache / "base", logs),
                 "current": Tree("current", ROOT, python, cache / "current", logs)}
        for name, tree in trees.items():
            got = Path(tree.probe()["pipeline"]).resolve()
            if tree.path.resolve() not in got.parents:
                raise SetupError(f"the {name} tree imports pipeline from {got}, not from {tree.path}")
        samples = {n: sha256(t.path / "data" / "sample" / "pairs.tsv") for n, t in trees.items()}
        result["sample_sha256"] = samples
        if samples["base"] != samples["current"]:
            log("note: data/sample/pairs.tsv differs between the trees: the default and cross cases read different data")

        # The tiny cross model, converted once into a directory both trees read.
        ckpt = write_tiny_checkpoint(work / "tiny-cross-checkpoint")
        model = work / "models" / "tiny-cross"
        convert = ["convert", str(ckpt), str(model), "--mode", "cross", "--name", "tiny-cross", "--force"]
        trees["current"].pipeline(convert, "convert-tiny-cross")
        converted_by = "current"
        if not trees["base"].probe(model)["reads_model"]:
            log("the base tree cannot read the current tree's model directory: converting with the base tree")
            trees["base"].pipeline(convert, "convert-tiny-cross")
            converted_by = "base"
        for name, tree in trees.items():
            p = tree.probe(model)
            if not p["reads_model"]:
                raise SetupError(f"the {name} tree cannot read {model}: {p.get('error')}")
        meta = json.loads((model / "model.json").read_text())
        result["tiny_model"] = {"path": str(model), "converted_by": converted_by, "seed": SEED,
                                "format_version": meta.get("format_version"), "params_sha256": meta.get("params_sha256")}
        own = {}  # the same checkpoint converted by each tree into its own directory
        for name, tree in trees.items():
            own[name] = work / "models" / f"tiny-cross-{name}"
            tree.pipeline(["convert", str(ckpt), str(own[name]), "--mode", "cross", "--name", "tiny-cross", "--force"],
                          f"convert-tiny-cross-{name}")
        small = write_small_data(ROOT / "data" / "sample" / "pairs.tsv", work / "data" / "small-with-bad-rows.tsv")
        result["small_data"] = small

        cases = {
            "default": lambda out: ["run", "--out", str(out), "--no-progress"],
            "cross-own": lambda out: ["run", "data/sample", "--model", str(own.get(Path(out).parent.name, "MODEL")), "--out", str(out),
                                      "--no-progress"],
            "cross": lambda out: ["run", "data/sample", "--model", str(model), "--out", str(out), "--no-progress"],
            "cross-small": lambda out: ["run", small["file"], "--model", str(model), "--out", str(out),
                                        "--no-progress", "--threads", "1", "--workers", "0", "--window-rows", "1000",
                                        "--chunk-rows", "300"],
        }
        result["cases"] = {c: {"command": f("OUT"), "seconds": {}} for c, f in cases.items()}
        for side in SIDES:
            for case, command in cases.items():
                out = outs / side / case
                if out.exists():
                    shutil.rmtree(out)
                result["cases"][case]["seconds"][side] = round(trees[side].pipeline(command(out), case), 2)
        for side in SIDES:
            meta_file = cache / side / "models" / "all-MiniLM-L6-v2" / "model.json"
            if meta_file.is_file():
                result.setdefault("default_model_format_version", {})[side] = json.loads(meta_file.read_text()).get("format_version")
        for case in cases:
            result["cases"][case]["files"] = compare_case(outs / "base" / case, outs / "current" / case)
    except SetupError as e:
        log(f"error: {e}")
        result["error"] = str(e)
        write_json(args.json, result)
        return 2
    finally:
        remove_worktree(wt)

    rows = [(case, name, r) for case, c in result["cases"].items() for name, r in c["files"].items()]
    identical = all(r["identical"] for _, _, r in rows)
    result["identical"] = identical
    write_json(args.json, result)

    print(f"base {args.base} ({result['base_commit'][:12]}) vs current checkout ({result['current']['head'][:12]}"
          f"{', uncommitted changes' if result['current']['dirty'] else ''}); tiny model converted by the "
          f"{result['tiny_model']['converted_by']} tree")
    print(f"{'case':<12} {'file':<32} {'identical':<9}  bytes (base / current)")
    for case, name, r in rows:
        size = f"{r.get('bytes_base')} / {r.get('bytes_current')}"
        print(f"{case:<12} {name:<32} {'yes' if r['identical'] else 'NO':<9}  {size}")
    for case, name, r in rows:
        if r["identical"]:
            continue
        if "missing" in r:
            print(f"\n{case} {name}: missing in {', '.join(r['missing'])}")
        elif name == "report.json":
            print(f"\n{case} report.json differs: " + "; ".join(r["first_difference"]["all"]))
        else:
            d = r["first_difference"]
            print(f"\n{case} {name}: first difference at line {d['line']}\n  base:    {d['base']!r}\n"
                  f"  current: {d['current']!r}")
    for case, name, r in rows:
        if r.get("keys_one_side"):
            print(f"note: {case} report.json keys on one side only: {', '.join(r['keys_one_side'])}")
    print(f"\n{'IDENTICAL' if identical else 'DIFFERENT'}; JSON: {args.json}")
    return 0 if identical else 1


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
