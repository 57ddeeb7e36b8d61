"""Vocabulary pruning, full vs pruned model: size, start-up, memory and speed (issue 5).

    python scripts/bench_prune.py [--model DIR] [--data FILES...] [--random-ernie3] [--rate-pairs N]

1. Prunes --model (default: the default model, all-MiniLM-L6-v2) on --data (default: the sample)
   with `python -m pipeline prune-vocab`, timed.
2. For the full and the pruned model: parameter file bytes, embedding rows, predictor creation
   time (median of 3, alternating the two models, in this process), and one `python -m pipeline
   run` each on the data (or its first --rate-pairs pairs), started by a small wrapper process that
   reports `getrusage(RUSAGE_CHILDREN).ru_maxrss`, i.e. the peak resident memory of the run's
   process tree (the largest single process: the main one). rows/s is the run's report.json value
   (processing, without start-up).
3. Checks the two runs' scores agree (max abs difference, identical ranking), prints a table and
   writes JSON (default bench_out/prune.json, or bench_out/prune-ernie3.json).

--random-ernie3 benchmarks instead a random model shaped like ERNIE 3.0 base (12 layers, hidden
768, 12 heads, FFN 3072, task-type embeddings, PaddleNLP layout, cross mode, 2 classes) over a
40,000-token vocab: the MiniLM WordPiece vocab (so the sample's English tokenizes into real word
pieces) plus `[unusedN]` filler entries, which WordPiece never produces (brackets are split off as
punctuation). Its rows/s is measured on the first 500 pairs by default, so it finishes in minutes.
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

sys.path.insert(0, str(ROOT / "scripts" / "bench"))

from common import timed_run  # noqa: E402
from pipeline.config import DEFAULT_INPUT, cpu_count, default_model_source  # noqa: E402

ERNIE3_VOCAB = 40_000

def make_ernie3_checkpoint(folder: Path, seed: int = 0, h: int = 768, layers: int = 12, heads: int = 12,
                           ffn: int = 3072, max_pos: int = 2048) -> Path:
    """A random ERNIE 3.0 base-shaped checkpoint in PaddleNLP layout (names as ErnieForSequenceClassification)."""
    import numpy as np
    import paddle

    folder.mkdir(parents=True, exist_ok=True)
    minilm_vocab = (default_model_source() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    used = set(minilm_vocab)
    filler, i = [], 0
    while len(minilm_vocab) + len(filler) < ERNIE3_VOCAB:
        tok = f"[unused{i}]"
        if tok not in used:
            filler.append(tok)
        i += 1
    (folder / "vocab.txt").write_text("\n".join(minilm_vocab + filler) + "\n", encoding="utf-8")
    cfg = {"vocab_size": ERNIE3_VOCAB, "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
           "intermediate_size": ffn, "hidden_act": "gelu", "max_position_embeddings": max_pos, "type_vocab_size": 4,
           "use_task_id": True, "task_type_vocab_size": 3, "layer_norm_eps": 1e-5, "pad_token_id": 0,
           "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02}
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape, dtype=np.float32) * 0.02)  # noqa: E731
    ones = lambda n: np.ones(n, np.float32)  # noqa: E731
    zeros = lambda n: np.zeros(n, np.float32)  # noqa: E731
    e = "ernie.embeddings"
    state = {f"{e}.word_embeddings.weight": w(ERNIE3_VOCAB, h), f"{e}.position_embeddings.weight": w(max_pos, h),
             f"{e}.token_type_embeddings.weight": w(4, h), f"{e}.task_type_embeddings.weight": w(3, h),
             f"{e}.layer_norm.weight": ones(h), f"{e}.layer_norm.bias": zeros(h)}
    for i in range(layers):
        p = f"ernie.encoder.layers.{i}"
        for x in "qkv":
            state[f"{p}.self_attn.{x}_proj.weight"], state[f"{p}.self_attn.{x}_proj.bias"] = w(h, h), zeros(h)
        state[f"{p}.self_attn.out_proj.weight"], state[f"{p}.self_attn.out_proj.bias"] = w(h, h), zeros(h)
        state[f"{p}.linear1.weight"], state[f"{p}.linear1.bias"] = w(h, ffn), zeros(ffn)
        state[f"{p}.linear2.weight"], state[f"{p}.linear2.bias"] = w(ffn, h), zeros(h)
        for n in ("norm1", "norm2"):
            state[f"{p}.{n}.weight"], state[f"{p}.{n}.bias"] = ones(h), zeros(h)
    state["ernie.pooler.dense.weight"], state["ernie.pooler.dense.bias"] = w(h, h), zeros(h)
    state["classifier.weight"], state["classifier.bias"] = w(h, 2) * 50, zeros(2)  # visible score spread
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(folder / "model_state.pdparams"))
    (folder / "model_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def first_pairs(src: Path, dst: Path, n: int) -> Path:
    with open(src, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    with open(dst, "w", encoding="utf-8") as f:
        for r in rows[: n + 1]:
            f.write("\t".join(r) + "\n")
    return dst


def predictor_creation_seconds(dirs: list[Path], threads: int, repeats: int = 3) -> list[float]:
    """Median creation time of a PaddlePredictor per model, the models alternating each round."""
    from pipeline.engine.modeldir import load_model_info
    from pipeline.engine.predictor import PaddlePredictor, PredictorSettings

    times: list[list[float]] = [[] for _ in dirs]
    for _ in range(repeats):
        for i, d in enumerate(dirs):
            info = load_model_info(d)
            t0 = time.perf_counter()
            pred = PaddlePredictor(info, PredictorSettings(threads=threads))
            times[i].append(time.perf_counter() - t0)
            del pred
    return [statistics.median(t) for t in times]


def _scores(out: Path) -> list[float]:
    return [float(line.split("\t")[2]) for line in (out / "predictions.tsv").read_text().splitlines()]


def _ranking(out: Path) -> list[list[str]]:
    return [line.split("\t")[:3] for line in (out / "ranked.tsv").read_text().splitlines()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="runtime model directory (default: the default model)")
    ap.add_argument("--data", type=Path, nargs="+", default=[DEFAULT_INPUT / "pairs.tsv"],
                    help="data to prune for and to run on")
    ap.add_argument("--random-ernie3", action="store_true",
                    help="benchmark a random 12-layer 768-hidden ERNIE 3.0-shaped model with a 40,000-token vocab")
    ap.add_argument("--rate-pairs", type=int, default=None,
                    help="measure rows/s on the first N pairs of the (first) data file "
                         "(default: all for --model, 500 for --random-ernie3)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "prune")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: bench_out/prune[-ernie3].json)")
    args = ap.parse_args()
    threads = args.threads or cpu_count()
    work = args.workdir / ("ernie3" if args.random_ernie3 else "model")
    work.mkdir(parents=True, exist_ok=True)

    prepare = {}
    if args.random_ernie3:
        from pipeline.convert import convert

        t0 = time.perf_counter()
        ckpt = make_ernie3_checkpoint(work / "checkpoint")
        prepare["checkpoint_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = convert(ckpt, work / "full", mode="cross", force=True, max_seq_len=512, name="random-ernie3.0-base")
        prepare["convert_seconds"] = time.perf_counter() - t0
        rate_pairs = args.rate_pairs or 500
    elif args.model:
        full, rate_pairs = args.model, args.rate_pairs
    else:
        from pipeline.cli import default_model

        full, rate_pairs = default_model().path, args.rate_pairs
    pruned = work / "pruned"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "prune-vocab", str(full), "--data", *map(str, args.data),
                    "--out", str(pruned), "--force"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    prepare["prune_seconds"] = time.perf_counter() - t0
    run_data = [first_pairs(args.data[0], work / "rate.tsv", rate_pairs)] if rate_pairs else list(args.data)

    from pipeline.engine.modeldir import load_model_info

    infos = [load_model_info(full), load_model_info(pruned)]
    creation = predictor_creation_seconds([full, pruned], threads)
    runs = [timed_run(run_data, work / f"out-{name}", ["--model", str(d), "--threads", str(threads)])
            for d, name in ((full, "full"), (pruned, "pruned"))]
    s_full, s_pruned = _scores(work / "out-full"), _scores(work / "out-pruned")
    max_diff = max(abs(a - b) for a, b in zip(s_full, s_pruned))
    same_ranking = _ranking(work / "out-full") == _ranking(work / "out-pruned")

    models = {}
    for name, info, c, r in zip(("full", "pruned"), infos, creation, runs):
        rep = r["report"]
        models[name] = {"path": str(info.path), "params_bytes": info.params_file.stat().st_size,
                        "embedding_rows": info.vocab_size, "predictor_creation_seconds": c,
                        "peak_rss_mb": r["peak_rss_mb"], "rows_per_second": rep["rows_per_second"],
                        "run_wall_seconds": r["wall_seconds"], "run_startup_seconds": rep["seconds"]["startup"],
                        "unknown_tokens": rep["tokens"].get("unknown_tokens", 0)}
    result = {
        "model": infos[0].name, "layers": infos[0].num_hidden_layers, "hidden": infos[0].hidden_size,
        "data": [str(p) for p in args.data], "rate_rows": runs[0]["report"]["rows"]["scored"],
        "threads": threads, "prepare": prepare, "full": models["full"], "pruned": models["pruned"],
        "scores_max_abs_diff": max_diff, "same_ranking": same_ranking,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cpu_count(),
                    "python": platform.python_version(), "MKL_DEBUG_CPU_TYPE": os.environ.get("MKL_DEBUG_CPU_TYPE")},
    }
    out = args.out or ROOT / "bench_out" / ("prune-ernie3.json" if args.random_ernie3 else "prune.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    f, p = models["full"], models["pruned"]
    rows = [
        ("parameter file (MB)", f"{f['params_bytes'] / 1e6:.1f}", f"{p['params_bytes'] / 1e6:.1f}",
         p["params_bytes"] / f["params_bytes"]),
        ("embedding rows", f"{f['embedding_rows']}", f"{p['embedding_rows']}", p["embedding_rows"] / f["embedding_rows"]),
        ("predictor creation (s, median of 3)", f"{f['predictor_creation_seconds']:.2f}",
         f"{p['predictor_creation_seconds']:.2f}", p["predictor_creation_seconds"] / f["predictor_creation_seconds"]),
        ("peak RSS of a run (MB)", f"{f['peak_rss_mb']:.0f}", f"{p['peak_rss_mb']:.0f}", p["peak_rss_mb"] / f["peak_rss_mb"]),
        (f"rows/s ({result['rate_rows']} pairs)", f"{f['rows_per_second']:.1f}", f"{p['rows_per_second']:.1f}",
         p["rows_per_second"] / f["rows_per_second"]),
        ("run wall time (s)", f"{f['run_wall_seconds']:.1f}", f"{p['run_wall_seconds']:.1f}",
         p["run_wall_seconds"] / f["run_wall_seconds"]),
    ]
    print(f"{result['model']} ({result['layers']} layers, hidden {result['hidden']}), {threads} threads")
    w = max(len(r[0]) for r in rows)
    print(f"{'':<{w}}  {'full':>10}  {'pruned':>10}  {'pruned/full':>11}")
    for k, a, b, ratio in rows:
        print(f"{k:<{w}}  {a:>10}  {b:>10}  {ratio:>11.3f}")
    print(f"scores: max abs diff {max_diff:.3g}, same ranking: {same_ranking}; unknown tokens in the pruned run: "
          f"{p['unknown_tokens']}")
    print("preparation: " + ", ".join(f"{k} {v:.1f}" for k, v in prepare.items()))
    print(f"JSON: {out}")
    return 0 if max_diff <= 1e-6 and same_ranking else 1


if __name__ == "__main__":
    sys.exit(main())
