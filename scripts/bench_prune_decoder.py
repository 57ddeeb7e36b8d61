"""Vocabulary pruning of the generation model, full vs pruned: decode step, head share, end to end
(issue 16).

    python scripts/bench_prune_decoder.py --pruned DIR [--full DIR] [--data FILE] [--threads 2]
        [--steps 32] [--rounds 3] [--context 128] [--skip-e2e] [--out bench_out/prune-decoder.json]

DIR comes from `python -m pipeline prune-vocab FULL --data FILE --out DIR` (the gate figures are
read from its model.json). Run it under `flock /tmp/cpu.lock` on an otherwise idle machine.

1. Decode ms per step at batch 1 and 8 (`DecoderPredictor`, the engine's, `threads` math threads):
   a prompt of `context` tokens (the same tokens for both models: kept ids, given to the pruned
   model as its rows) is prefilled, then `steps` steps are timed, feeding each row's greedy
   token; median per step over the steps of `rounds` rounds, the two models alternating.
2. The head alone, as the step runs it: the tied head's matmul [B, H] x [V, H]^T as a Paddle
   Inference program with the decode program's configuration (oneDNN, no IR passes, same threads)
   for V = full and pruned rows, and the host's log-softmax over V (`engine.logits.log_softmax`,
   what the decoding loop does with every step's logits). Head share of a step = (head matmul +
   log-softmax) / (step + log-softmax).
3. End to end: `python -m pipeline generate --model M --out TMP DATA --threads T` for each model
   (the run's report.json generated tokens/s, without start-up, and the wall time with it).
4. Parameter file sizes; the gate record of the pruned model.

Prints a table and writes JSON; every figure names the CPU it was measured on.
"""

from __future__ import annotations

import zlib  # noqa: F401 - before paddle

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import DEFAULT_GENERATE_INPUT, DEFAULT_GENERATION_MODEL_NAME, cache_dir  # noqa: E402
from pipeline.engine.modeldir import load_model_info  # noqa: E402


def cpu_info() -> dict:
    from pipeline.engine.cpu import CpuFeatures

    c = CpuFeatures.detect()
    return {"model": c.model, "cores": os.cpu_count(), **{k: v for k, v in c.to_dict().items() if k != "model"}}


def decode_steps(model_dir: Path, batch: int, context: int, steps: int, threads: int, full_ids: np.ndarray,
                 to_rows) -> list[float]:
    from pipeline.engine.decoder_predictor import DecoderPredictor

    pred = DecoderPredictor(model_dir, batch, context + steps + 1, threads=threads)
    ids = np.stack([np.roll(full_ids, b) for b in range(batch)])[:, :context]
    rows = to_rows(ids)
    mask = np.ones((batch, context), np.float32)
    pos = np.tile(np.arange(context, dtype=np.int64), (batch, 1))
    logits = pred.prefill(rows, pos, mask)
    times = []
    for s in range(steps):
        tok = logits.argmax(-1)[:, None].astype(np.int64)
        mask = np.ones((batch, context + s + 1), np.float32)
        t0 = time.perf_counter()
        logits = pred.step(tok, np.full((batch, 1), context + s, np.int64), mask)
        times.append(time.perf_counter() - t0)
    return times


def head_program(folder: Path, weight: np.ndarray) -> Path:
    """A Paddle Inference program of the tied head alone: hidden [B, H] -> logits [B, V]."""
    import paddle
    from paddle.static import InputSpec

    class Head(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.w = self.create_parameter(list(weight.shape))
            self.w.set_value(weight)

        def forward(self, h):
            return paddle.matmul(h, self.w, transpose_y=True)

    static = paddle.jit.to_static(Head(), input_spec=[InputSpec([None, weight.shape[1]], "float32", "h")],
                                  full_graph=True)
    paddle.jit.save(static, str(folder / "head"))
    return folder / "head"


def time_head(prefix: Path, batch: int, hidden: int, threads: int, repeats: int) -> tuple[list[float], list[float]]:
    from pipeline.engine.decoder_predictor import _config
    from pipeline.engine.logits import log_softmax
    from pipeline.engine.paddle_env import import_inference

    infer = import_inference()
    cfg = _config(prefix.with_suffix(".pdmodel"), prefix.with_suffix(".pdiparams"), threads, True, False, 64)
    pred = infer.create_predictor(cfg)
    h_in, out = pred.get_input_handle("h"), pred.get_output_handle(pred.get_output_names()[0])
    h = np.random.default_rng(0).standard_normal((batch, hidden)).astype(np.float32)
    mm, sm = [], []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        h_in.reshape(list(h.shape))
        h_in.copy_from_cpu(h)
        pred.run()
        logits = out.copy_to_cpu()
        t1 = time.perf_counter()
        log_softmax(logits)
        t2 = time.perf_counter()
        if i >= 3:  # warm-up
            mm.append(t1 - t0)
            sm.append(t2 - t1)
    return mm, sm


def e2e(model_dir: Path, data: Path, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "generate", str(data), "--model", str(model_dir), "--out",
                        f"{tmp}/out", "--threads", str(threads), "--no-progress"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        rep = json.loads(Path(f"{tmp}/out/report.json").read_text())
        gens = [json.loads(line) for line in Path(f"{tmp}/out/generations.jsonl").read_text().splitlines()]
    return {"wall_seconds": round(wall, 2), "generated_tokens_per_second": rep["generated_tokens_per_second"],
            "generated_tokens": rep["tokens"].get("generated", rep.get("generation", {}).get("generated_tokens")),
            "unknown_prompt_tokens": rep["tokens"].get("unknown_tokens", 0), "metrics": rep.get("metrics"),
            "token_ids": [g["candidates"][0]["token_ids"] for g in gens]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", type=Path, default=cache_dir() / "models" / DEFAULT_GENERATION_MODEL_NAME)
    ap.add_argument("--pruned", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_GENERATE_INPUT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "prune-decoder.json")
    args = ap.parse_args()

    full, pruned = load_model_info(args.full), load_model_info(args.pruned)
    kept = pruned.vocab_map.kept
    rng = np.random.default_rng(0)
    prompt = kept[rng.integers(3, len(kept), args.context + 8)]  # kept ids, so both models see the same tokens
    models = {"full": (full, lambda ids: ids), "pruned": (pruned, lambda ids: pruned.vocab_map.rows(ids))}
    report: dict = {"cpu": cpu_info(), "python": platform.python_version(), "threads": args.threads,
                    "context": args.context, "steps": args.steps, "rounds": args.rounds,
                    "load_before": os.getloadavg()[0], "models": {}}

    step: dict = {(m, b): [] for m in models for b in args.batches}
    for _ in range(args.rounds):
        for b in args.batches:
            for name, (info, to_rows) in models.items():
                step[(name, b)] += decode_steps(info.path, b, args.context, args.steps, args.threads, prompt, to_rows)

    import paddle

    paddle.set_device("cpu")
    from pipeline.convert.decoder_prune import read_program_params

    emb = next(v for k, v in read_program_params(full.path).items() if k.startswith("embedding"))
    heads: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows in (("full", None), ("pruned", kept)):
            d = Path(tmp) / name
            d.mkdir()
            prefix = head_program(d, emb if rows is None else np.ascontiguousarray(emb[rows]))
            for b in args.batches:
                heads[(name, b)] = time_head(prefix, b, emb.shape[1], args.threads, 20 * args.rounds)

    for name, (info, _) in models.items():
        rec: dict = {"path": str(info.path), "vocab_rows": info.vocab_size,
                     "params_bytes": info.params_file.stat().st_size, "batches": {}}
        for b in args.batches:
            s = statistics.median(step[(name, b)]) * 1e3
            mm, sm = (statistics.median(x) * 1e3 for x in heads[(name, b)])
            rec["batches"][str(b)] = {"step_ms": round(s, 2), "head_matmul_ms": round(mm, 3),
                                      "log_softmax_ms": round(sm, 3),
                                      "head_share": round((mm + sm) / (s + sm), 4)}
        report["models"][name] = rec
    if not args.skip_e2e:
        for name, (info, _) in models.items():
            report["models"][name]["e2e"] = e2e(info.path, args.data, args.threads)
        a, b = (report["models"][m]["e2e"].pop("token_ids") for m in ("full", "pruned"))
        report["e2e_identical_rows"] = sum(x == y for x, y in zip(a, b))
        report["e2e_rows"] = len(a)
    report["gate"] = pruned.gates.get("pruning")
    report["pruning"] = {k: v for k, v in pruned.meta["pruning"].items() if k != "data"}
    report["load_after"] = os.getloadavg()[0]

    f, p = report["models"]["full"], report["models"]["pruned"]
    print(f"CPU: {report['cpu']['model']} ({report['cpu']['cores']} cores), {args.threads} threads, context "
          f"{args.context}, medians over {args.rounds} x {args.steps} steps")
    print(f"{'':34} {'full':>12} {'pruned':>12}")
    print(f"{'vocabulary rows':34} {f['vocab_rows']:>12,} {p['vocab_rows']:>12,}")
    print(f"{'decoder.pdiparams MB':34} {f['params_bytes'] / 1e6:>12.1f} {p['params_bytes'] / 1e6:>12.1f}")
    for b in args.batches:
        fb, pb = f["batches"][str(b)], p["batches"][str(b)]
        print(f"{f'decode ms/step, batch {b}':34} {fb['step_ms']:>12.2f} {pb['step_ms']:>12.2f}")
        print(f"{f'  head matmul ms, batch {b}':34} {fb['head_matmul_ms']:>12.3f} {pb['head_matmul_ms']:>12.3f}")
        print(f"{f'  log-softmax ms, batch {b}':34} {fb['log_softmax_ms']:>12.3f} {pb['log_softmax_ms']:>12.3f}")
        print(f"{f'  head share of the step, batch {b}':34} {100 * fb['head_share']:>11.1f}% "
              f"{100 * pb['head_share']:>11.1f}%")
    if "e2e" in f:
        print(f"{'generate: generated tokens/s':34} {f['e2e']['generated_tokens_per_second']:>12.1f} "
              f"{p['e2e']['generated_tokens_per_second']:>12.1f}")
        print(f"{'generate: wall s (with start-up)':34} {f['e2e']['wall_seconds']:>12.1f} {p['e2e']['wall_seconds']:>12.1f}")
        print(f"rows with identical token ids: {report['e2e_identical_rows']}/{report['e2e_rows']}")
    g = report["gate"]
    if g:
        print(f"gate ({g['rows']} held-out rows): ROUGE-L {g['base']['rouge_l']:.4f} -> {g['candidate']['rouge_l']:.4f}"
              f" (loss {100 * g['loss_rate']['rouge_l']:.2f}%), BLEU {g['base']['bleu']:.2f} -> "
              f"{g['candidate']['bleu']:.2f} (loss {100 * g['loss_rate']['bleu']:.2f}%), identical "
              f"{g['identical_rows']}/{g['rows']}: {'PASSED' if g['passed'] else 'FAILED'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
