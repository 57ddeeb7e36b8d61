"""The measuring loop every system of the generation peer benchmark runs (`bench_generate.py --peers`).

Standard library only, so that the same file serves our venv (ours, PaddleNLP) and .venv-bench
(transformers, CTranslate2, llama.cpp). A system is a `backend` object with

    generate(prompts: list[list[int]], max_new_tokens: int, beams: int, batch: int, force_length: bool)
        -> list[list[int]]   # generated ids per prompt, input order

that batches `prompts` its own way with at most `batch` prompts (x beams rows) at a time, and,
with `force_length`, ignores EOS so that every row generates exactly `max_new_tokens` tokens.

What is measured, identically for every system:

- decode ms per step at batch B (greedy only): the first B prompts of the sample (cycled when
  the sample has fewer), EOS ignored, timed once with 1 new token and once with M; (T_M - T_1) /
  (M - 1) is the cost of one decode step of a B-row batch (prefill and set-up cancel out), after
  an untimed 2-token run of the same shape;
- the best batch: the B of --step-batches with the lowest ms per row-step (ms per step / B);
- the whole sample: every prompt, at the best batch (prompts x beams rows), EOS honoured, after
  an untimed warm-up batch; generated tokens are counted per row up to and including the first
  EOS; tokens/s = those tokens / wall seconds of the one call;
- peak RSS of the process (VmHWM) at the end: weights, caches and everything.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

EOS = 2


def trim(row, eos: int = EOS) -> list[int]:
    """Generated ids up to and including the first EOS."""
    out = []
    for t in row:
        out.append(int(t))
        if t == eos:
            break
    return out


def sorted_chunks(prompts: list[list[int]], batch: int) -> list[list[int]]:
    """Prompt indices sorted by length (longest first), cut into chunks of `batch`: how the peers
    batch (our pipeline sorts by length as well)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM of /proc/self/status (the high-water mark of this
    executable's own address space). getrusage's ru_maxrss is not used: Linux carries it over
    from the parent through fork and exec, so a child of a big parent would report the parent's."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure(backend, prompts: list[list[int]], *, max_new_tokens: int, beams: int, step_batches: list[int],
            sample_batch: int | None, eos: int = EOS) -> dict:
    """Decode ms per step (greedy), then the whole sample at the best (or the given) batch."""
    M = max_new_tokens
    out: dict = {"beams": beams, "max_new_tokens": M}
    if beams == 1 and step_batches:
        assert M >= 2, "decode steps are timed as T(M new tokens) - T(1): M must be >= 2"
        steps = {}
        for B in step_batches:
            rows = [prompts[i % len(prompts)] for i in range(B)]
            backend.generate(rows, 2, 1, B, True)  # warm-up of this shape, untimed
            t0 = time.perf_counter()
            backend.generate(rows, 1, 1, B, True)
            t1 = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = backend.generate(rows, M, 1, B, True)
            tm = time.perf_counter() - t0
            assert all(len(g) == M for g in got), (
                f"force_length gave {sorted(set(map(len, got)))} tokens per row, not {M}")
            ms = (tm - t1) / (M - 1) * 1000
            steps[str(B)] = {"ms_per_step": round(ms, 2), "ms_per_row_step": round(ms / B, 3),
                             "seconds_1_token": round(t1, 3), "seconds_m_tokens": round(tm, 3),
                             "mean_prompt_tokens": round(sum(map(len, rows)) / B, 1)}
            print(f"   batch {B}: {ms:.1f} ms per decode step ({ms / B:.2f} per row)", file=sys.stderr, flush=True)
        out["decode_steps"] = steps
        best = min(steps, key=lambda b: steps[b]["ms_per_row_step"])
        out["best_step_batch"] = int(best)
    if sample_batch is None:
        sample_batch = out.get("best_step_batch", 8)
    prompts_per_batch = max(1, sample_batch // beams)
    out["sample_batch_prompts"] = prompts_per_batch
    backend.generate(prompts[:min(prompts_per_batch, len(prompts))], 4, beams, prompts_per_batch, False)  # warm-up
    c0, t0 = os.times(), time.perf_counter()
    gen = backend.generate(prompts, M, beams, prompts_per_batch, False)
    wall = time.perf_counter() - t0
    c1 = os.times()
    gen = [trim(g, eos)[:M] for g in gen]
    n = sum(map(len, gen))
    out.update({"generated_tokens": n, "seconds": round(wall, 3), "tokens_per_second": round(n / wall, 2),
                "cpu_seconds": round(c1.user + c1.system - c0.user - c0.system, 2), "generated": gen})
    print(f"   sample: {len(prompts)} prompts, {n} tokens in {wall:.1f} s = {n / wall:.1f} tokens/s "
          f"({prompts_per_batch} prompts x {beams} beams per batch)", file=sys.stderr, flush=True)
    return out


def run_child(build, spec_path: str) -> None:
    """A child's main: read the spec, build the backend (`build(spec) -> (backend, info)`), measure,
    write the result (or the error) to spec['out']."""
    spec = json.loads(Path(spec_path).read_text())
    res: dict = {}
    try:
        t0 = time.perf_counter()
        backend, info = build(spec)
        res["load_seconds"] = round(time.perf_counter() - t0, 2)
        res.update(info)
        prompts = json.loads(Path(spec["prompts"]).read_text())
        res.update(measure(backend, prompts, max_new_tokens=spec["max_new_tokens"], beams=spec["beams"],
                           step_batches=spec.get("step_batches") or [], sample_batch=spec.get("sample_batch")))
    except Exception as e:  # noqa: BLE001 - recorded by the parent, not hidden
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-3000:]
        print(res["traceback"], file=sys.stderr)
    res["peak_rss_mb"] = peak_rss_mb()
    Path(spec["out"]).write_text(json.dumps(res))
