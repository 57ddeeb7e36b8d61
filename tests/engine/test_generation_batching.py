"""Pre-padded generation batches on a key/value-cache budget (pipeline/engine/generation_batching.py)."""

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pipeline.engine.generation_batching import (
    GenerationBudget,
    GenerationBudgetError,
    KVCacheSpec,
    check_fits,
    left_pad,
    plan_generation_batches,
    position_ids_from_mask,
    restore_order,
)
from pipeline.errors import ConfigError

KV = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=4)  # 2 * 2 * 2 * 4 * 4 = 128 bytes per token


def test_bytes_per_token_counts_layers_keys_values_heads_and_fp32():
    assert KV.bytes_per_token == 2 * 2 * 2 * 4 * 4
    smollm2 = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, dim_per_head=64)
    assert KVCacheSpec.of(smollm2).bytes_per_token == 30 * 2 * 3 * 64 * 4  # 46,080 bytes a token


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=0, max_size=120), st.integers(1, 40), st.integers(1, 4),
       st.integers(2_000, 400_000), st.integers(4, 64), st.sampled_from([None, 1, 7, 32]), st.sampled_from([1, 8]))
def test_plan_covers_every_prompt_once_sorted_and_within_budget(lengths, new, rpp, cache_bytes, cap, window, multiple):
    lengths = np.array(lengths, dtype=np.int64)
    budget = GenerationBudget(KV, cache_bytes, cap, window=window, pad_multiple=multiple)
    longest = int(-(-lengths.max() // multiple) * multiple) if len(lengths) else 0
    if len(lengths) and ((longest + new) * rpp * KV.bytes_per_token > cache_bytes or rpp > cap):
        with pytest.raises(GenerationBudgetError):
            plan_generation_batches(lengths, new, rpp, budget)
        return
    batches = plan_generation_batches(lengths, new, rpp, budget)
    rows = np.concatenate([b.rows for b in batches]) if batches else np.array([], np.int64)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    w = window or max(len(lengths), 1)
    for b in batches:
        assert len(b.rows) >= 1
        # the KV cache at the last step: (padded prompt + new tokens) x rows x beams x bytes per token
        assert (b.prompt_len + new) * len(b.rows) * rpp * KV.bytes_per_token == b.cache_bytes(KV) <= cache_bytes
        assert b.model_rows == len(b.rows) * rpp <= cap
        assert b.prompt_len % multiple == 0 and 0 <= b.prompt_len - lengths[b.rows].max() < multiple
        assert len(set((b.rows // w).tolist())) == 1, "a batch spans two windows"
    # within a window, the batches' rows in order are sorted longest first, ties in input order
    for start in range(0, len(lengths), w):
        in_window = [i for i in rows.tolist() if start <= i < start + w]
        assert in_window == sorted(in_window, key=lambda i: (-lengths[i], i))
    # filled: a batch closed early only because the next prompt would not fit (or its window ended)
    for b, nxt in zip(batches, batches[1:]):
        if b.rows[0] // w == nxt.rows[0] // w:
            grown = (b.prompt_len + new) * (len(b.rows) + 1) * rpp * KV.bytes_per_token
            assert grown > cache_bytes or (len(b.rows) + 1) * rpp > cap


def test_impossible_sequences_are_refused_at_plan_time():
    budget = GenerationBudget(KV, max_cache_bytes=(10 + 6) * 2 * KV.bytes_per_token, max_batch_rows=8)
    plan_generation_batches([10, 3], max_new_tokens=6, rows_per_prompt=2, budget=budget)  # exactly fits
    with pytest.raises(GenerationBudgetError, match=r"needs 4,352 bytes of key/value cache.*budget of 4,096"):
        plan_generation_batches([3, 11, 2], max_new_tokens=6, rows_per_prompt=2, budget=budget)
    with pytest.raises(GenerationBudgetError, match="max-new-tokens"):
        check_fits(10, 7, 2, budget)  # the start-up check, from the longest prompt allowed
    with pytest.raises(GenerationBudgetError, match="row cap"):
        plan_generation_batches([1], 1, 9, budget)
    with pytest.raises(GenerationBudgetError, match="positions"):
        check_fits(10, 6, 1, GenerationBudget(KV, 10**9, 8, max_positions=15))
    assert issubclass(GenerationBudgetError, ConfigError)  # the CLI reports it as a setting to change
    assert plan_generation_batches([], 6, 2, budget) == []


def test_budget_bounds_rows_and_beams_multiply():
    budget = GenerationBudget(KV, max_cache_bytes=100 * 20 * KV.bytes_per_token, max_batch_rows=128)
    one = plan_generation_batches([16] * 40, 4, 1, budget)  # 20 columns a row: 100 rows fit, 40 asked
    assert [len(b.rows) for b in one] == [40]
    four = plan_generation_batches([16] * 40, 4, 4, budget)  # 4 beams a prompt: 25 prompts a batch
    assert [len(b.rows) for b in four] == [25, 15]
    capped = plan_generation_batches([16] * 40, 4, 4, GenerationBudget(KV, 10**9, max_batch_rows=32))
    assert [len(b.rows) for b in capped] == [8, 8, 8, 8, 8]


def test_left_pad_positions_and_mask():
    prompts = [[5, 6, 7], [8], [9, 10]]
    p = left_pad(prompts, np.array([0, 2, 1]), 4, pad_id=0)
    assert p.input_ids.tolist() == [[0, 5, 6, 7], [0, 0, 9, 10], [0, 0, 0, 8]]
    assert p.attention_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert p.position_ids.tolist() == [[0, 0, 1, 2], [0, 0, 0, 1], [0, 0, 0, 0]]
    # the same rule as the Paddle decoder's (cumsum - 1 over real tokens, 0 on padding), on a
    # mask with the step columns appended
    mask = np.concatenate([p.attention_mask, np.ones((3, 2), np.int64)], axis=1)
    assert position_ids_from_mask(mask)[:, -2:].tolist() == [[3, 4], [2, 3], [1, 2]]


def test_restore_order_puts_results_back_in_input_order():
    lengths = np.array([3, 9, 1, 9, 4, 2, 7])
    budget = GenerationBudget(KV, (9 + 2) * 2 * KV.bytes_per_token, 64, window=4)
    batches = plan_generation_batches(lengths, 2, 1, budget)
    assert len(batches) > 2
    per_batch = [[f"out{int(i)}" for i in b.rows] for b in batches]
    assert restore_order(batches, per_batch, len(lengths)) == [f"out{i}" for i in range(len(lengths))]
    with pytest.raises(AssertionError):
        restore_order(batches, per_batch[:-1] + [per_batch[-1][:-1]], len(lengths))
