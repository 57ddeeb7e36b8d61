import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pipeline.batching import Batch, pad_batch, plan_batches
from pipeline.tokenizer import Encoded, Ragged


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 290), min_size=0, max_size=400), st.integers(300, 5000), st.integers(1, 80),
       st.sampled_from([1, 8]))
def test_plan_batches_covers_every_row_once_within_budget(lengths, budget, cap, multiple):
    lengths = np.array(lengths, dtype=np.int64)
    batches = plan_batches(lengths, budget, cap, multiple)
    rows = np.concatenate([b.rows for b in batches]) if batches else np.array([], dtype=np.int64)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b.rows) <= cap
        assert b.padded_tokens <= budget
        assert b.seq_len % multiple == 0
        assert b.seq_len >= lengths[b.rows].max()
        assert b.seq_len - lengths[b.rows].max() < multiple


def test_sorted_batches_pad_little():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, 20000)
    batches = plan_batches(lengths, 8192, 64)
    padded = sum(b.padded_tokens for b in batches)
    assert padded / lengths.sum() - 1 < 0.02


def test_sequence_longer_than_budget_is_refused():
    with pytest.raises(AssertionError, match="does not fit"):
        plan_batches(np.array([10, 600]), 512, 8)


def test_pad_batch_places_tokens_and_mask():
    ids = Ragged.from_lists([[1, 2, 3], [4], [5, 6]])
    types = Ragged.from_lists([[0, 0, 1], [0], [0, 1]])
    enc = Encoded(ids, types)
    x, t, m = pad_batch(enc, Batch(np.array([0, 2, 1]), 4), pad_id=0)
    assert x.tolist() == [[1, 2, 3, 0], [5, 6, 0, 0], [4, 0, 0, 0]]
    assert t.tolist() == [[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert m.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    assert x.dtype == np.int64 and m.dtype == np.float32
