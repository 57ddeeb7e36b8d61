"""Pre-padded generation batches on a key/value-cache memory budget (no paddle).

EET's pre-padding: a batch's prompts are left-padded so that every row's last prompt token sits
in the last column; every row then generates at the same column and one decode step is one
[B, 1] call. Position ids count real tokens only (`cumsum(mask) - 1`), so a row's positions, and
with a model that never attends padding its outputs, do not depend on its batch.

What bounds a generation batch is the key/value cache, not the prompt: it holds every layer's
keys and values for every column, prompt padding included, until the last step. A batch of B
prompts of padded length L, each decoded as `rows_per_prompt` rows (beams, or samples), needs

    (L + max_new_tokens) x B x rows_per_prompt x bytes_per_token,
    bytes_per_token = layers x 2 (key, value) x kv_heads x head_dim x bytes per value (4, fp32)

`plan_generation_batches` closes batches on that budget and on a cap of model rows, and refuses
at plan time, before any model call, if a single prompt cannot fit (`check_fits` does the same
check at start-up from the longest prompt allowed).

Cuts: prompts are sorted by length within a window (longest first, stable) and batches are
filled to the budget in that order. Unlike the encoder's planner (`batching.plan_batches`, a
dynamic programme trading padding against a per-call cost), filling is the right rule here:
every batch pays its `max_new_tokens` decode calls, each with a fixed cost (dispatch, reading
the weights once), so fewer, fuller batches win, and sorted neighbours already keep the padding
small. The longest prompts go first, so a budget too small for the data fails on the first batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.errors import ConfigError


class GenerationBudgetError(ConfigError):
    """One sequence cannot fit the generation memory budget or row cap; the message says which
    setting to change."""


@dataclass(frozen=True)
class KVCacheSpec:
    """What one cached token costs: every layer keeps a key and a value of kv_heads x head_dim."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    bytes_per_value: int = 4  # float32

    def __post_init__(self) -> None:
        assert min(self.num_layers, self.num_kv_heads, self.head_dim, self.bytes_per_value) >= 1, self

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.bytes_per_value

    @classmethod
    def of(cls, cfg, bytes_per_value: int = 4) -> "KVCacheSpec":
        """From a `DecoderConfig` (or anything with the same three attributes)."""
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dim_per_head, bytes_per_value)


@dataclass(frozen=True)
class GenerationBudget:
    kv: KVCacheSpec
    max_cache_bytes: int  # the key/value cache of one batch, all layers, at its longest
    max_batch_rows: int  # model rows of one batch: prompts x rows_per_prompt
    window: Optional[int] = None  # sort within windows of this many consecutive prompts (None: all)
    pad_multiple: int = 1  # padded prompt length rounded up to a multiple (8 for GPU kernels)
    max_positions: Optional[int] = None  # the model's positions: real prompt + new tokens must fit

    def __post_init__(self) -> None:
        assert self.max_cache_bytes >= 1 and self.max_batch_rows >= 1 and self.pad_multiple >= 1, self
        assert self.window is None or self.window >= 1, self


@dataclass(frozen=True)
class GenerationBatch:
    rows: np.ndarray  # indices into the prompts, longest first
    prompt_len: int  # padded prompt length (the longest prompt, rounded up to pad_multiple)
    max_new_tokens: int
    rows_per_prompt: int  # beams, or samples, per prompt

    @property
    def model_rows(self) -> int:
        return len(self.rows) * self.rows_per_prompt

    @property
    def cache_tokens(self) -> int:
        """Cached columns x model rows at the last step, padding included."""
        return (self.prompt_len + self.max_new_tokens) * self.model_rows

    def cache_bytes(self, kv: KVCacheSpec) -> int:
        return self.cache_tokens * kv.bytes_per_token

    @property
    def padded_prompt_tokens(self) -> int:
        return len(self.rows) * self.prompt_len


def _round_up(n: np.ndarray | int, multiple: int):
    return -(-n // multiple) * multiple


def rows_that_fit(prompt_len: int, max_new_tokens: int, rows_per_prompt: int, budget: GenerationBudget) -> int:
    """How many prompts of padded length `prompt_len` one batch may hold (0: not even one)."""
    per_prompt = (prompt_len + max_new_tokens) * rows_per_prompt * budget.kv.bytes_per_token
    return int(min(budget.max_cache_bytes // per_prompt, budget.max_batch_rows // rows_per_prompt))


def check_fits(prompt_len: int, max_new_tokens: int, rows_per_prompt: int, budget: GenerationBudget) -> None:
    """Refuse a prompt of `prompt_len` real tokens that no batch could hold; run it at start-up
    with the longest prompt allowed, so that a run fails before it reads its input."""
    assert max_new_tokens >= 1 and rows_per_prompt >= 1 and prompt_len >= 1
    if budget.max_positions is not None and prompt_len + max_new_tokens > budget.max_positions:
        raise GenerationBudgetError(
            f"a prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"{budget.max_positions} positions: shorten the prompt limit or lower --max-new-tokens")
    if rows_per_prompt > budget.max_batch_rows:
        raise GenerationBudgetError(
            f"one prompt decodes as {rows_per_prompt} rows (beams or samples), more than the row cap "
            f"max_batch_rows={budget.max_batch_rows}: raise the cap or lower --num-beams/--num-return-sequences")
    padded = int(_round_up(prompt_len, budget.pad_multiple))
    if rows_that_fit(padded, max_new_tokens, rows_per_prompt, budget) < 1:
        need = (padded + max_new_tokens) * rows_per_prompt * budget.kv.bytes_per_token
        raise GenerationBudgetError(
            f"a prompt of {prompt_len} tokens (padded to {padded}) with max_new_tokens={max_new_tokens} and "
            f"{rows_per_prompt} row(s) per prompt needs {need:,} bytes of key/value cache "
            f"({padded + max_new_tokens} columns x {rows_per_prompt} x {budget.kv.bytes_per_token:,} bytes per token), "
            f"more than the budget of {budget.max_cache_bytes:,} bytes: raise the cache budget, or lower "
            f"--max-new-tokens, --num-beams or the prompt limit")


def plan_generation_batches(lengths: Sequence[int] | np.ndarray, max_new_tokens: int, rows_per_prompt: int,
                            budget: GenerationBudget) -> list[GenerationBatch]:
    """Cut prompts of `lengths` real tokens into pre-padded batches within `budget`.

    Within each window of `budget.window` consecutive prompts (the whole input if None), prompts
    are sorted longest first (stable: equal lengths keep input order) and batches are filled to
    the budget in that order; no batch spans two windows. Every prompt lands in exactly one
    batch; `restore_order` puts per-batch results back in input order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    assert lengths.ndim == 1
    if len(lengths) == 0:
        return []
    assert lengths.min() >= 1, "empty prompts cannot be generated from"
    check_fits(int(lengths.max()), max_new_tokens, rows_per_prompt, budget)
    window = budget.window or len(lengths)
    batches: list[GenerationBatch] = []
    for start in range(0, len(lengths), window):
        order = start + np.argsort(-lengths[start:start + window], kind="stable")
        padded = _round_up(lengths[order], budget.pad_multiple)
        i = 0
        while i < len(order):
            k = min(rows_that_fit(int(padded[i]), max_new_tokens, rows_per_prompt, budget), len(order) - i)
            batches.append(GenerationBatch(order[i:i + k], int(padded[i]), max_new_tokens, rows_per_prompt))
            i += k
    return batches


@dataclass(frozen=True)
class PaddedPrompts:
    input_ids: np.ndarray  # int64 [B, L], left-padded
    attention_mask: np.ndarray  # int64 [B, L], 1 on real tokens (a suffix of each row)
    position_ids: np.ndarray  # int64 [B, L], 0.. on real tokens, 0 on padding


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """Positions counted over real tokens (cumsum - 1), 0 on padding: numpy twin of
    `pipeline.convert.decoder.position_ids_from_mask`."""
    mask = np.asarray(mask).astype(np.int64)
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None) * mask


def left_pad(prompts: Sequence[Sequence[int]], rows: np.ndarray, prompt_len: int, pad_id: int) -> PaddedPrompts:
    """`prompts[rows]` left-padded to `prompt_len` columns."""
    b = len(rows)
    ids = np.full((b, prompt_len), pad_id, dtype=np.int64)
    mask = np.zeros((b, prompt_len), dtype=np.int64)
    for r, i in enumerate(rows):
        p = np.asarray(prompts[int(i)], dtype=np.int64)
        assert 1 <= len(p) <= prompt_len, f"prompt {int(i)} has {len(p)} tokens, the batch {prompt_len} columns"
        ids[r, prompt_len - len(p):] = p
        mask[r, prompt_len - len(p):] = 1
    return PaddedPrompts(ids, mask, position_ids_from_mask(mask))


def restore_order(batches: Sequence[GenerationBatch], results: Sequence[Sequence], n: int) -> list:
    """Per-batch results (one per row of each batch, in the batch's row order) -> input order."""
    out: list = [None] * n
    for batch, res in zip(batches, results, strict=True):
        assert len(res) == len(batch.rows), f"{len(res)} results for a batch of {len(batch.rows)}"
        for i, r in zip(batch.rows, res):
            assert out[int(i)] is None, f"prompt {int(i)} is in two batches"
            out[int(i)] = r
    missing = [i for i, r in enumerate(out) if r is None]
    assert not missing, f"prompts {missing[:5]} are in no batch"
    return out
