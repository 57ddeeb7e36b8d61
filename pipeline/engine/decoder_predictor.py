"""Prefill and decode steps of an exported decoder (convert/decoder_export.py) on Paddle Inference.

`DecoderPredictor` loads `prefill.pdmodel` and `decode.pdmodel` (both reading `decoder.pdiparams`)
as two CPU predictors, creates their input and output handles once, and keeps the key/value
cache on the host in memory allocated once, at construction. One caller at a time.

How the cache reaches the decode program. Figures: SmolLM2-135M fp32, batch 8, 2 threads, an
Intel Xeon with AVX-512/AMX, ms per step; "bench" = `scripts/bench_decode_step.py` (the context
grows by one per step, as in decoding; the last run, with the range of three runs where it
moved), "fixed T" = the same step repeated at one context.

- `feed="copy"` (kept for comparison): per layer and step, the live part cache[:, :, :T] of a
  [B, KV, max_len, D] array, which is not contiguous, is gathered into one reused contiguous
  staging array and `copy_from_cpu`'d: two copies of the whole live cache per step, and Paddle
  reallocates each input as it grows. Bench: 113 / 133 / 168 ms at contexts 32 / 128 / 512
  (168-251 at 512: more when every step also grows Paddle's input tensors; fixed T: the copies
  alone 44 ms at 512; `copy_from_cpu` of the strided view gathers too).
- Reusing the input handles does not avoid it: a handle keeps its memory between runs, but
  not a layout that grows by a column per (b, kv) row.
- `share_external_data`: Paddle 2.6's `Tensor.share_external_data` takes a `paddle.Tensor`;
  `paddle.base.core.eager.Tensor(array, CPUPlace(), False, True)` (the last argument is
  `zero_copy`) wraps a C-contiguous numpy array without copying, and the input handle then
  reads that memory directly (`paddle.utils.dlpack.from_dlpack` copies: checked). Sharing a
  fresh contiguous copy of the live part per step halves the copying (fixed T: 22 ms at 512).
- `feed="shared"` (the default): no copy per step. Each layer's key and value live in one flat
  buffer of max_batch * KV * max_len * D floats (allocated once), viewed as a contiguous
  [B, KV, C, D] array whose capacity C is the context rounded up to a multiple of `block` (32).
  That array itself is shared with the decode program's past_key_i / past_value_i handles, once
  per change of C; a step feeds only ids, positions and a [B, C + 1] mask whose columns
  T..C-1 are 0, and writes the new [B, KV, 1, D] column into the array at column T. The unused
  columns are never attended (exp(-1e9) is exactly 0 in float32; the buffers start zeroed and
  only ever hold finite cache values). When the context reaches C the buffers are re-laid out in
  place to the next multiple: one copy of the live part every `block` steps. A step then reads
  the cache once, in the attention matmuls. Bench: 105 / 109 / 118 ms at contexts 32 / 128 / 512
  (105-110 / 103-111 / 118-122; fed columns 64 / 160 / 544), 109-118 ms mean over 64
  consecutive steps from 128 with the re-layouts. Tying a handle to our memory is safe because
  the decode program only reads its past inputs (they feed matmuls directly; the tests check
  that a run leaves the cache unchanged).
- Time-major [max_len, B, KV, D] buffers make the live part a contiguous prefix (zero-copy
  without the rounding), but the program must then transpose it: a plain transpose is a copy
  inside the program (fixed T: 154 ms at 512 against 105), and with reshape2 + transpose2 folded
  into oneDNN's matmul (reshape_transpose_matmul fuse) the strided matmuls grew 20 ms from
  context 32 to 512 against 8 ms for contiguous ones. Not used.

The decode program runs WITHOUT Paddle's IR optimisation passes (`decode_ir_optim=False`), the
prefill program with them. Measured here (SmolLM2, 2 threads, ms per step, median of 6):
batch 8 at context 32 / 512 and batch 32 at 128: 82 / 103 / 147 without the passes against
119 / 142 / 210 with them (the numbers in the list above were taken with them); creating the
predictor is also 2 s faster. The prefill pass is the other way round (a [32, 100] prompt pass:
4.4 s with the passes, 6.3 s without), so each program gets its own setting. The logits are
the same either way (the converter's check and the tests run this configuration, < 1e-4).

oneDNN is on by default: same logits (tests: < 1e-4 against the dynamic graph) and 5-10% faster
than the plain CPU kernels here (bench without it: 114 / 115 / 124 ms, 113-118 / 115-121 /
124-136).

MKL_DEBUG_CPU_TYPE=5 is set on AMD CPUs only (`engine/paddle_env.py`): on this Intel Xeon it forces
MKL onto its AVX2 kernels and made the step about 20% slower (fixed T, context 32: 107 -> 130 ms).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.engine.batching import plan_batches
from pipeline.engine.paddle_env import import_inference

paddle_infer = import_inference()
from paddle.base import core  # noqa: E402 - after paddle_env has imported paddle

from pipeline.engine.decoder_precision import (  # noqa: E402
    DEFAULT_INT8_OPS,
    apply_precision,
    decode_ir_optim_default,
    decode_precision_default,
    params_file,
    prepared_program,
)
from pipeline.engine.decoder_io import (  # noqa: E402
    DECODE_PROGRAM,
    PREFILL_PROGRAM,
    decode_io,
    prefill_io,
    program_io_shapes,
)

FEEDS = ("shared", "copy")
# The fixed cost of one prefill call in prompt tokens of work (dispatching ~1000 ops); what a
# group of shorter prompts must save in padding to get a call of its own. Measured
# (scripts/bench_batch_curve.py, SmolLM2, 2 threads): 136 ms per call + 2.05 ms per prompt
# token, so a call costs about 66 tokens of work (README "Prefill and decode batch sizes").
PREFILL_CALL_TOKENS = 64


class DecoderCacheFull(RuntimeError):
    """A step would need more than the max_len columns the cache was allocated with."""


def _config(program: Path, params: Path, threads: int, onednn: bool, ir_optim: bool,
            onednn_cache_capacity: int, precision: str = "fp32", int8_ops: tuple[str, ...] = ()) -> paddle_infer.Config:
    config = paddle_infer.Config(str(program), str(params))
    config.switch_ir_optim(ir_optim)
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(threads)
    config.enable_memory_optim()
    if onednn:
        config.enable_mkldnn()
        config.set_mkldnn_cache_capacity(onednn_cache_capacity)
        apply_precision(config, precision, int8_ops or DEFAULT_INT8_OPS)
    config.switch_use_feed_fetch_ops(False)
    config.switch_specify_input_names(True)
    config.disable_glog_info()
    return config


def _create(program: Path, params: Path, threads: int, onednn: bool, ir_optim: bool, onednn_cache_capacity: int,
            precision: str, int8_ops: tuple[str, ...], optimized_cache: Path | None):
    """A predictor of `program`; bf16 from the program Paddle's passes made of it once and saved
    in `optimized_cache` (decoder_precision.prepared_program: the bf16 passes take minutes)."""
    ready = None
    if precision == "bf16" and ir_optim and onednn and optimized_cache is not None:
        from pipeline.engine.cpu import CpuFeatures

        ready = prepared_program(program, params, precision, threads, optimized_cache, CpuFeatures.detect().isa)
    if ready is not None:
        return paddle_infer.create_predictor(_config(*ready, threads, onednn, False, onednn_cache_capacity))
    return paddle_infer.create_predictor(_config(program, params, threads, onednn, ir_optim, onednn_cache_capacity,
                                                 precision, int8_ops))


class DecoderPredictor:
    """Prefill a left-padded batch, then decode one token per row per `step`.

    - `prefill(input_ids, position_ids, attention_mask)`: [B, S] each (B <= max_batch,
      S <= max_len); returns the last column's logits [B, V] and fills the cache with the S
      prompt columns (`length` = S).
    - `step(input_ids, position_ids, attention_mask)`: [B, 1], [B, 1], [B, length + 1] (the mask
      over the cached columns and the new one); returns logits [B, V] and writes the new
      key/value column into the cache at column `length` (then `length` += 1).
    - `select(rows)`: the cache keeps row rows[i] as its row i (beam search, finished rows
      dropped): the `StepModel` interface of engine/decoding.py.
    - `truncate(length)`: forget the columns from `length` on (to decode again from there).
    - `insert(rows, input_ids, position_ids, attention_mask)`: continuous batching: prefill new
      prompts into rows of the running batch, ending at the current column; `compact(first)`:
      drop the first columns (see engine/continuous.py).
    - `cache`: per layer (key, value) views [B, KV, length, D] of the live cache (no copy).
    """

    def __init__(self, model_dir: Path | str, max_batch: int, max_len: int, *, threads: int = 1,
                 onednn: bool = True, ir_optim: bool = True, decode_ir_optim: bool | None = None,
                 feed: str = "shared", block: int = 32,
                 onednn_cache_capacity: int = 64, group_prefill: bool = True,
                 prefill_call_tokens: int = PREFILL_CALL_TOKENS, precision: str = "fp32",
                 int8_ops: tuple[str, ...] = (), optimized_cache: Path | None = None,
                 decode_precision: str | None = None):
        assert max_batch >= 1 and max_len >= 1 and block >= 1, (max_batch, max_len, block)
        assert feed in FEEDS, f"feed must be one of {FEEDS}, got {feed!r}"
        assert precision == "fp32" or onednn, f"{precision} runs on oneDNN's kernels only"
        d = Path(model_dir)
        self.precision = precision
        # bf16 and int8 are made by IR passes, so the decode program needs them there
        # (engine/decoder_precision.py: what each precision runs, and its measured speed).
        if decode_precision is None:
            decode_precision = decode_precision_default(precision)
        self.decode_precision = decode_precision
        if decode_ir_optim is None:
            decode_ir_optim = decode_ir_optim_default(decode_precision)
        self._prefill, self._decode = (
            _create(d / prog, params_file(d, prog), threads, onednn, ir, onednn_cache_capacity, prec, int8_ops,
                    optimized_cache)
            for prog, ir, prec in ((PREFILL_PROGRAM, ir_optim, precision),
                                   (DECODE_PROGRAM, decode_ir_optim, decode_precision)))

        names = list(self._decode.get_input_names())
        self.num_layers = (len(names) - 3) // 2
        for what, pred, (want_in, want_out) in (("prefill", self._prefill, prefill_io(self.num_layers)),
                                                ("decode", self._decode, decode_io(self.num_layers))):
            got_in, got_out = list(pred.get_input_names()), list(pred.get_output_names())
            assert (got_in, got_out) == (want_in, want_out), (
                f"{d}: the {what} program takes {got_in} -> {got_out}, expected {want_in} -> {want_out}")
        _, self.kv_heads, _, self.head_dim = program_io_shapes(d / DECODE_PROGRAM)[want_in[3]]

        self._pre_in = [self._prefill.get_input_handle(n) for n in prefill_io(self.num_layers)[0]]
        self._pre_out = [self._prefill.get_output_handle(n) for n in prefill_io(self.num_layers)[1]]
        self._dec_in = [self._decode.get_input_handle(n) for n in decode_io(self.num_layers)[0]]
        self._dec_out = [self._decode.get_output_handle(n) for n in decode_io(self.num_layers)[1]]

        self.max_batch, self.max_len, self.block, self.feed = max_batch, max_len, block, feed
        self.group_prefill, self.prefill_call_tokens = group_prefill, prefill_call_tokens
        self.prefill_tokens = 0  # prompt columns x rows the prefill calls computed, summed
        size = max_batch * self.kv_heads * max_len * self.head_dim
        # One flat buffer per layer and kind (key, value), viewed as [B, KV, capacity, D].
        self._flat = [np.zeros(size, np.float32) for _ in range(2 * self.num_layers)]
        self._views: list[np.ndarray] = []
        self._shared: list = []  # the zero-copy paddle tensors the decode handles read
        self._staging: np.ndarray | None = None  # feed="copy" only: one contiguous layer, reused
        self.batch = self.length = self.capacity = 0

    # ------------------------------------------------------------------ cache layout

    @property
    def cache_bytes(self) -> int:
        return sum(f.nbytes for f in self._flat)

    @property
    def cache(self) -> list[tuple[np.ndarray, np.ndarray]]:
        v = [x[:, :, :self.length] for x in self._views]
        return list(zip(v[0::2], v[1::2]))

    def _view(self, flat: np.ndarray, capacity: int) -> np.ndarray:
        n = self.batch * self.kv_heads * capacity * self.head_dim
        return flat[:n].reshape(self.batch, self.kv_heads, capacity, self.head_dim)

    def _capacity_for(self, columns: int) -> int:
        """Columns the buffers are laid out for when `columns` must fit: a multiple of block."""
        return min(-(-columns // self.block) * self.block, self.max_len)

    def _lay_out(self, capacity: int) -> None:
        """View the buffers as [B, KV, capacity, D], moving the live columns to the new layout
        (in place, growing or shrinking; numpy copies through a temporary where source and
        destination overlap)."""
        if self.length:
            rows = self.batch * self.kv_heads
            for flat in self._flat:
                old = flat[:rows * self.capacity * self.head_dim].reshape(rows, self.capacity, self.head_dim)
                new = flat[:rows * capacity * self.head_dim].reshape(rows, capacity, self.head_dim)
                new[:, :self.length] = old[:, :self.length]
        self.capacity = capacity
        self._views = [self._view(f, capacity) for f in self._flat]
        self._share_views()

    def _share_views(self) -> None:
        if self.feed == "shared":
            assert all(v.flags.c_contiguous for v in self._views)  # zero_copy needs it
            # Tensor(value, place, persistable, zero_copy): wraps the array's memory, no copy.
            self._shared = [core.eager.Tensor(v, core.CPUPlace(), False, True) for v in self._views]
            for handle, t in zip(self._dec_in[3:], self._shared):
                handle.share_external_data(t)

    def select(self, rows: np.ndarray) -> None:
        """Keep cache row `rows[i]` as row i (repeats allowed: beams of one parent; rows left out:
        finished sequences). One gather of the live columns, done in place in the buffers."""
        rows = np.asarray(rows, dtype=np.int64)
        assert self.batch, "select before prefill"
        assert rows.ndim == 1 and 1 <= len(rows) <= self.max_batch, (
            f"select {len(rows)} rows: between 1 and max_batch {self.max_batch}")
        assert rows.min() >= 0 and rows.max() < self.batch, f"rows {rows} outside the batch of {self.batch}"
        gathered = [v[rows, :, :self.length] for v in self._views]  # fancy indexing: copies
        self.batch = len(rows)
        self._views = [self._view(f, self.capacity) for f in self._flat]
        for view, g in zip(self._views, gathered):
            view[:, :, :self.length] = g
        self._share_views()

    def truncate(self, length: int) -> None:
        assert 0 < length <= self.length, f"truncate to {length}: the cache holds {self.length} columns"
        self.length = length
        if self._capacity_for(length + 1) != self.capacity:
            self._lay_out(self._capacity_for(length + 1))

    # ------------------------------------------------------------------ running

    @staticmethod
    def _feed(handle, arr: np.ndarray, dtype) -> None:
        arr = np.ascontiguousarray(arr, dtype=dtype)
        handle.reshape(list(arr.shape))
        handle.copy_from_cpu(arr)

    def prefill_groups(self, attention_mask: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """The prefill calls of a left-padded batch: (rows, columns) per call, each call the
        last `columns` columns of its rows (see `prefill`)."""
        real = np.asarray(attention_mask).sum(axis=1).astype(np.int64)
        if not self.group_prefill:
            return [(np.arange(len(real)), int(attention_mask.shape[1]))]
        plan = plan_batches(np.maximum(real, 1), max_batch_tokens=1 << 62, max_batch_size=len(real),
                            batch_cost_tokens=self.prefill_call_tokens)
        return [(np.sort(b.rows), b.seq_len) for b in plan]

    def prefill(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The prompt pass of a left-padded [B, S] batch. The rows are split into groups of
        similar real length (`prefill_groups`: padded tokens + a per-call cost minimised, as the
        encoder's batches are), and each group runs with only its own longest prompt's columns:
        the batch's padding would cost a full prompt pass per padded column, and a batch of
        mixed lengths holds much of it (70% on the sample's first 64 prompts). Each group's keys
        and values land right-aligned in the cache, in the same columns they would occupy in
        one [B, S] pass; the columns left of a row's group are zeros and masked, as padding is.
        A row's outputs do not change: it never attends padding, and its positions count real
        tokens only."""
        B, S = input_ids.shape
        assert position_ids.shape == attention_mask.shape == (B, S), (
            f"prefill inputs must share one [B, S] shape: {input_ids.shape}, {position_ids.shape}, "
            f"{attention_mask.shape}")
        assert B <= self.max_batch, f"batch {B} > max_batch {self.max_batch}"
        if S > self.max_len:
            raise DecoderCacheFull(f"a prompt of {S} columns does not fit a cache of max_len {self.max_len}")
        self.batch, self.length = B, 0
        self._lay_out(self._capacity_for(S + 1))
        logits = self._prefill_into(np.arange(B), S, input_ids, position_ids, attention_mask)
        self.length = S
        return logits

    def _prefill_into(self, dest: np.ndarray, end: int, input_ids: np.ndarray, position_ids: np.ndarray,
                      attention_mask: np.ndarray) -> np.ndarray:
        """Run the prompt pass of a left-padded [n, S] batch in groups of similar length and
        write its keys and values right-aligned into cache rows `dest`, columns [end - S, end);
        the rows' columns left of their group's are zeroed (masked, as padding is)."""
        n, S = input_ids.shape
        whole_cache = len(dest) == self.batch and end == S and np.array_equal(dest, np.arange(self.batch))
        logits = None
        for rows, cols in self.prefill_groups(attention_mask):
            part = slice(S - cols, S)
            whole = len(rows) == n
            for handle, arr, dtype in zip(self._pre_in, (input_ids, position_ids, attention_mask),
                                          (np.int64, np.int64, np.float32)):
                self._feed(handle, arr[:, part] if whole else arr[rows, part], dtype)
            self._prefill.run()
            self.prefill_tokens += len(rows) * cols
            out = self._pre_out[0].copy_to_cpu()
            if logits is None:
                logits = np.empty((n,) + out.shape[1:], out.dtype)
            logits[rows] = out
            for view, handle in zip(self._views, self._pre_out[1:]):
                if whole and whole_cache:
                    view[:, :, end - cols:end] = handle.copy_to_cpu()
                    view[:, :, :end - cols] = 0
                else:
                    at = dest[rows]
                    view[at, :, end - cols:end] = handle.copy_to_cpu()
                    view[at, :, :end - cols] = 0
        return logits

    def insert(self, rows: np.ndarray, input_ids: np.ndarray, position_ids: np.ndarray,
               attention_mask: np.ndarray) -> np.ndarray:
        """Continuous batching: prefill n new prompts (a left-padded [n, S] batch, S <= `length`)
        into cache rows `rows`, right-aligned at the current column: their keys and values fill
        columns [length - S, length), so their next token is written at column `length` with
        every other row's. A row may be an existing one (a finished sequence's, overwritten) or
        one past the batch (the batch grows; such rows must continue batch, batch + 1, ...).
        Returns the logits after each new prompt's last token [n, V]."""
        rows = np.asarray(rows, dtype=np.int64)
        n, S = input_ids.shape
        assert self.batch, "insert before prefill"
        assert position_ids.shape == attention_mask.shape == (n, S) and rows.shape == (n,), (
            f"insert: rows {rows.shape}, inputs {input_ids.shape}, {position_ids.shape}, {attention_mask.shape}")
        assert S <= self.length, f"insert: a prompt of {S} columns cannot end at column {self.length}"
        assert len(np.unique(rows)) == n and rows.min() >= 0, f"insert: rows {rows} repeat or are negative"
        grown = rows[rows >= self.batch]
        new_batch = self.batch + len(grown)
        assert new_batch <= self.max_batch, f"insert: {new_batch} rows > max_batch {self.max_batch}"
        assert set(grown.tolist()) == set(range(self.batch, new_batch)), (
            f"insert: rows past the batch of {self.batch} must continue it: {sorted(grown.tolist())}")
        if new_batch > self.batch:
            # The buffers are [B, KV, capacity, D] with B outermost: existing rows keep their memory.
            self.batch = new_batch
            self._views = [self._view(f, self.capacity) for f in self._flat]
            self._share_views()
        return self._prefill_into(rows, self.length, input_ids, position_ids, attention_mask)

    def compact(self, first: int) -> None:
        """Drop the cache's first `first` columns (no row attends them any more): every layer's
        live columns move left by `first`, one copy of the live cache."""
        assert 0 < first < self.length, f"compact {first} columns of {self.length}"
        keep = self.length - first
        for view in self._views:
            view[:, :, :keep] = view[:, :, first:self.length]  # numpy copies through a temporary on overlap
        self.length = keep  # the layout keeps its capacity (a smaller one would be a second copy)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        B, T = self.batch, self.length
        assert B, "step before prefill"
        assert input_ids.shape == position_ids.shape == (B, 1), (
            f"step takes one token per row: input_ids {input_ids.shape}, position_ids {position_ids.shape}, "
            f"batch {B}")
        assert attention_mask.shape == (B, T + 1), (
            f"attention_mask {attention_mask.shape}: the step needs [B, cached + 1] = {(B, T + 1)}")
        if T + 1 > self.max_len:
            raise DecoderCacheFull(f"the cache holds max_len {self.max_len} columns, all used")
        if T + 1 > self.capacity:
            self._lay_out(self._capacity_for(T + 1))
        ids, pos, mask_in, past = self._dec_in[0], self._dec_in[1], self._dec_in[2], self._dec_in[3:]
        self._feed(ids, input_ids, np.int64)
        self._feed(pos, position_ids, np.int64)
        if self.feed == "shared":
            mask = np.zeros((B, self.capacity + 1), np.float32)  # columns T..C-1: unused, not attended
            mask[:, :T] = attention_mask[:, :T]
            mask[:, -1] = attention_mask[:, T]
        else:  # for comparison: the live part copied into the program's inputs, twice per layer
            mask = attention_mask
            if self._staging is None:
                self._staging = np.empty(self._flat[0].size, np.float32)
            staging = self._staging[:B * self.kv_heads * T * self.head_dim].reshape(B, self.kv_heads, T, self.head_dim)
            for handle, view in zip(past, self._views):
                np.copyto(staging, view[:, :, :T])  # the strided live part made contiguous
                handle.reshape(list(staging.shape))
                handle.copy_from_cpu(staging)
        self._feed(mask_in, mask, np.float32)
        self._decode.run()
        for view, handle in zip(self._views, self._dec_out[1:]):
            view[:, :, T] = handle.copy_to_cpu()[:, :, 0]
        self.length = T + 1
        return self._dec_out[0].copy_to_cpu()

