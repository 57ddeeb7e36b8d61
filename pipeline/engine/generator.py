"""The generation engine: token-id prompts in, ranked candidates out (knows nothing about files).

    Generator(model, settings).generate(prompts, row_keys, decode) -> candidates per prompt, stats

Two ways to batch (`batching`):
- "continuous" (the default): per window of prompts (sorted longest first), one run of
  `continuous.decode_continuous`: a fixed number of slots (as many prompts as the window's first,
  longest, static batch holds within the cache budget and the row cap); when a prompt finishes,
  the next waiting one is prefilled into its cache rows. With several streams, the window's
  sorted prompts are dealt to the streams in turn, one continuous run each.
- "static": pre-padded batches planned on the key/value-cache budget (`generation_batching`),
  each run through `decoding.decode_batch` to its longest row.
Each runs on one of `streams` predictors (each a `DecoderPredictor` with its own cache and
`threads // streams` math threads; work goes to whichever stream is free), and input order is
restored. A prompt's candidates depend only on the prompt and the settings, never on the batch
or stream that ran it, so batching and streams change speed, not results.

`backend` replaces the Paddle predictors with any `decoding.StepModel` factory (tests).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np

from pipeline.cancel import CancelToken
from pipeline.engine.continuous import SlotPlan, decode_continuous, supports_continuous
from pipeline.engine.decoder_modeldir import DecoderModelInfo
from pipeline.engine.decoding import Candidate, DecodeStats, DecodingSettings, StepModel, decode_batch
from pipeline.engine.generation_batching import (
    GenerationBudget,
    KVCacheSpec,
    check_fits,
    left_pad,
    plan_generation_batches,
    restore_order,
    rows_that_fit,
)

StepModelFactory = Callable[[int, int, int], StepModel]  # (max_batch_rows, max_len, threads) -> a model
BATCHING = ("continuous", "static")
# Continuous batching: free prompt slots to wait for before a prefill call admits newcomers.
# 1 (refill at once) measured fastest: see README "How a batch runs".
ADMIT_MIN_DEFAULT = 1
FLUSH_PROMPTS = 8  # continuous batching: finished prompts handed to on_candidates / on_batch at a time


@dataclass(frozen=True)
class GeneratorSettings:
    decoding: DecodingSettings
    max_cache_bytes: int  # one batch's key/value cache at its longest
    max_batch_rows: int  # model rows of one batch (prompts x beams or samples)
    max_prompt_tokens: int  # longest prompt a batch may hold (the cache is sized for it)
    threads: int = 1
    streams: int = 1
    window: Optional[int] = None  # prompts sorted by length within windows of this many (None: the call)
    onednn: bool = True
    batching: str = "continuous"  # see BATCHING and the module doc
    admit_min: int = ADMIT_MIN_DEFAULT  # continuous: free slots that start a prefill of newcomers
    precision: str = "fp32"  # 'fp32' | 'bf16' | 'int8' (config.choose_precision decided it)

    def __post_init__(self) -> None:
        assert self.batching in BATCHING, f"batching must be one of {BATCHING}, got {self.batching!r}"
        assert self.admit_min >= 1, f"admit_min must be >= 1, got {self.admit_min}"

    @property
    def threads_per_stream(self) -> int:
        return max(1, self.threads // self.streams)


@dataclass
class GenerationStats(DecodeStats):
    seconds: float = 0.0  # wall time of the generate calls
    prefill_seconds: float = 0.0  # summed over streams
    step_seconds: float = 0.0  # summed over streams
    compact_seconds: float = 0.0  # continuous batching: dropping unused cache columns, summed over streams
    prefill_tokens: int = 0  # prompt tokens the prefill calls computed (grouped prefill: less than the padded batches)

    def add(self, other: DecodeStats) -> None:
        for f in fields(other):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class _Timed:
    """A StepModel that adds its prefill and step wall times into a DecodeStats-like record."""

    def __init__(self, model: StepModel):
        self.model = model
        self.prefill_seconds = self.step_seconds = self.compact_seconds = 0.0

    def prefill(self, *a):
        t0 = time.perf_counter()
        out = self.model.prefill(*a)
        self.prefill_seconds += time.perf_counter() - t0
        return out

    def step(self, *a):
        t0 = time.perf_counter()
        out = self.model.step(*a)
        self.step_seconds += time.perf_counter() - t0
        return out

    def select(self, rows):
        self.model.select(rows)

    def insert(self, *a):  # continuous batching's prefill of newcomers: counted as prefill
        t0 = time.perf_counter()
        out = self.model.insert(*a)
        self.prefill_seconds += time.perf_counter() - t0
        return out

    def compact(self, first):
        t0 = time.perf_counter()
        self.model.compact(first)
        self.compact_seconds += time.perf_counter() - t0


def kv_spec(model: DecoderModelInfo) -> KVCacheSpec:
    if model.meta.get("runtime") == "fused_multi_transformer":  # the GPU export: kv heads repeated, fp16
        return KVCacheSpec(model.num_hidden_layers, int(model.architecture["num_attention_heads"]), model.head_dim, 2)
    return KVCacheSpec(model.num_hidden_layers, model.num_key_value_heads, model.head_dim)


class Generator:
    def __init__(self, model: DecoderModelInfo, settings: GeneratorSettings,
                 backend: Optional[StepModelFactory] = None):
        s = settings
        assert 1 <= s.streams <= max(1, s.threads), f"streams {s.streams} need as many threads (got {s.threads})"
        self.model, self.settings = model, s
        self.budget = GenerationBudget(kv_spec(model), s.max_cache_bytes, s.max_batch_rows, s.window,
                                       max_positions=model.max_seq_len)
        self.max_len = s.max_prompt_tokens + s.decoding.max_new_tokens
        if backend is None:
            from pipeline.engine.decoder_predictor import DecoderPredictor
            from pipeline.paths import cache_dir

            def backend(rows: int, max_len: int, threads: int) -> StepModel:
                return DecoderPredictor(model.path, rows, max_len, threads=threads, onednn=s.onednn,
                                        precision=s.precision,
                                        int8_ops=model.quantization.onednn_int8_ops if model.quantization else (),
                                        optimized_cache=cache_dir())

        self._free: queue.Queue = queue.Queue()
        for _ in range(s.streams):
            self._free.put(backend(s.max_batch_rows, self.max_len, s.threads_per_stream))
        self._pool = ThreadPoolExecutor(s.streams, thread_name_prefix="generate") if s.streams > 1 else None

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _run_batch(self, prompts, batch, keys, decode, cancel: Optional[CancelToken]):
        if cancel is not None:
            cancel.check()
        model = self._free.get()
        try:
            before = getattr(model, "prefill_tokens", None)
            timed, stats = _Timed(model), DecodeStats()
            padded = left_pad(prompts, batch.rows, batch.prompt_len, self.settings.decoding.pad_token_id)
            out = decode_batch(timed, padded, self.settings.decoding, [keys[int(i)] for i in batch.rows], decode,
                               stats)
            # A model that does not count its prefill work (a test double) computes the padded batch.
            computed = stats.padded_prompt_tokens if before is None else model.prefill_tokens - before
            return out, stats, timed.prefill_seconds, timed.step_seconds, computed
        finally:
            self._free.put(model)

    def _run_continuous(self, prompts, order: np.ndarray, keys, decode, cancel: Optional[CancelToken], on_done):
        """One continuous run over `order` (prompt indices, longest first) on a free stream."""
        if cancel is not None:
            cancel.check()
        model = self._free.get()
        try:
            assert supports_continuous(model), (
                f"{type(model).__name__} cannot take prompts into a running batch (no insert/compact): "
                f"use batching='static'")
            s, d = self.settings, self.settings.decoding
            before = getattr(model, "prefill_tokens", None)
            timed, stats = _Timed(model), DecodeStats()
            longest = len(prompts[int(order[0])])
            slots = rows_that_fit(longest, d.max_new_tokens, d.rows_per_prompt, self.budget)
            assert slots >= 1, "check_fits let through a prompt that no batch holds"
            plan = SlotPlan(slots=min(slots, len(order)), columns=longest + d.max_new_tokens,
                            max_rows=s.max_batch_rows, admit_min=s.admit_min)
            out = decode_continuous(timed, prompts, order, d, plan, keys, decode, stats, on_done,
                                    None if cancel is None else cancel.check)
            computed = stats.padded_prompt_tokens if before is None else model.prefill_tokens - before
            return out, stats, timed.prefill_seconds, timed.step_seconds, timed.compact_seconds, computed
        finally:
            self._free.put(model)

    def _continuous_orders(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Per window, its prompts longest first (stable), dealt to the streams in turn."""
        s = self.settings
        window = s.window or len(lengths)
        parts = []
        for start in range(0, len(lengths), window):
            order = start + np.argsort(-lengths[start:start + window], kind="stable")
            parts += [order[j::s.streams] for j in range(s.streams) if len(order[j::s.streams])]
        return parts

    def _generate_continuous(self, prompts, keys, decode, cancel, on_batch, on_candidates,
                             stats: "GenerationStats") -> list[list[Candidate]]:
        s = self.settings
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        if len(prompts) == 0:
            return []
        check_fits(int(lengths.max()), s.decoding.max_new_tokens, s.decoding.rows_per_prompt, self.budget)
        results: list = [None] * len(prompts)
        pending: list[tuple[list[int], list[list[Candidate]]]] = []

        def flush() -> None:
            if not pending:
                return
            rows = np.array([p for ps, _ in pending for p in ps], dtype=np.int64)
            out = [c for _, cs in pending for c in cs]
            pending.clear()
            if on_candidates is not None:
                on_candidates(rows, out)
            if on_batch is not None:
                on_batch(len(rows), sum(c.num_tokens for cands in out for c in cands))

        def on_done(done: list[int], cands: list[list[Candidate]]) -> None:  # one stream: called inline
            pending.append((done, cands))
            if sum(len(ps) for ps, _ in pending) >= FLUSH_PROMPTS:
                flush()

        def collect(run) -> None:
            out, st, pre_s, step_s, compact_s, computed = run
            for p, cands in out.items():
                results[p] = cands
            stats.add(st)
            stats.prefill_seconds += pre_s
            stats.step_seconds += step_s
            stats.compact_seconds += compact_s
            stats.prefill_tokens += computed

        parts = self._continuous_orders(lengths)
        if self._pool is None:
            for order in parts:
                collect(self._run_continuous(prompts, order, keys, decode, cancel, on_done))
                flush()
        else:  # worker threads: results are handed on from this thread, a part at a time
            futures = [self._pool.submit(self._run_continuous, prompts, order, keys, decode, cancel, None)
                       for order in parts]
            try:
                for f in futures:
                    run = f.result()
                    collect(run)
                    done = sorted(run[0])
                    pending.append((done, [run[0][p] for p in done]))
                    flush()
            finally:
                for f in futures:
                    f.cancel()
        missing = [i for i, r in enumerate(results) if r is None]
        assert not missing, f"prompts {missing[:5]} were not generated"
        return results

    def generate(self, prompts: Sequence[Sequence[int]], row_keys: Optional[Sequence] = None,
                 decode: Optional[Callable[[Sequence[int]], str]] = None, cancel: Optional[CancelToken] = None,
                 on_batch: Optional[Callable[[int, int], None]] = None,
                 on_candidates: Optional[Callable[[np.ndarray, list[list[Candidate]]], None]] = None,
                 ) -> tuple[list[list[Candidate]], GenerationStats]:
        """Ranked candidates per prompt (input order) and what it took. `row_keys` key the sample
        rows (default: the prompt's index; pass stable ids to keep samples across splits);
        `on_batch(prompts, generated_tokens)` after each batch; `on_candidates(rows, candidates)`
        too, with the batch's prompt indices and their candidates (to start detokenizing them
        while the next batch decodes)."""
        t0 = time.perf_counter()
        s = self.settings
        for i, p in enumerate(prompts):
            assert 1 <= len(p) <= s.max_prompt_tokens, (
                f"prompt {i} has {len(p)} tokens; the generator was sized for 1..{s.max_prompt_tokens}")
        keys = list(range(len(prompts))) if row_keys is None else list(row_keys)
        assert len(keys) == len(prompts), f"{len(keys)} row keys for {len(prompts)} prompts"
        stats, results = GenerationStats(), []
        if s.batching == "continuous":
            out = self._generate_continuous(prompts, keys, decode, cancel, on_batch, on_candidates, stats)
            stats.seconds = time.perf_counter() - t0
            return out, stats
        batches = plan_generation_batches([len(p) for p in prompts], s.decoding.max_new_tokens,
                                          s.decoding.rows_per_prompt, self.budget)
        if self._pool is None:
            done = (self._run_batch(prompts, b, keys, decode, cancel) for b in batches)
        else:
            futures = [self._pool.submit(self._run_batch, prompts, b, keys, decode, cancel) for b in batches]
            done = (f.result() for f in futures)
        try:
            for batch, (out, st, pre_s, step_s, computed) in zip(batches, done):
                results.append(out)
                stats.add(st)
                stats.prefill_seconds += pre_s
                stats.step_seconds += step_s
                stats.prefill_tokens += computed
                if on_candidates is not None:
                    on_candidates(batch.rows, out)
                if on_batch is not None:
                    on_batch(len(batch.rows), st.generated_tokens)
        finally:
            if self._pool is not None:
                for f in futures:
                    f.cancel()
        stats.seconds = time.perf_counter() - t0
        return restore_order(batches, results, len(prompts)), stats
