import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pipeline.engine.batching import Batch, pad_batch, plan_batches
from pipeline.engine.tokenizer import Encoded, Ragged


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


def _greedy_cost(lengths, budget, cap, cost):
    """Independent reference: fill each batch to the budget, longest first."""
    ls = sorted(lengths, reverse=True)
    total, i = 0, 0
    while i < len(ls):
        k = min(cap, budget // ls[i], len(ls) - i)
        total += k * ls[i] + cost
        i += k
    return total


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=1, max_size=300), st.integers(200, 3000), st.integers(1, 50),
       st.integers(0, 1000))
def test_planned_cost_never_exceeds_greedy(lengths, budget, cap, cost):
    batches = plan_batches(np.array(lengths), budget, cap, 1, cost)
    planned = sum(b.padded_tokens + cost for b in batches)
    assert planned <= _greedy_cost(lengths, budget, cap, cost)


def test_default_settings_pad_the_sample_under_5_percent(minilm_src):
    """Issue 3's target, on the embedded sample's distinct texts at the default settings."""
    import csv

    from pipeline.config import DEFAULT_INPUT, RunConfig
    from pipeline.engine.modeldir import TokenizerSettings
    from pipeline.engine.tokenizer import WordPieceTokenizer

    tok = WordPieceTokenizer(minilm_src / "vocab.txt", TokenizerSettings(lowercase=True))
    with open(DEFAULT_INPUT / "pairs.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    texts = list(dict.fromkeys([r["query"] for r in rows] + [r["doc"] for r in rows]))
    lengths = tok.encode_single(texts, 256).lengths
    d = RunConfig()
    batches = plan_batches(lengths, d.max_batch_tokens, d.max_batch_size, 1)  # the CPU default multiple
    overhead = sum(b.padded_tokens for b in batches) / lengths.sum() - 1
    assert 0 <= overhead < 0.05


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


def _cu_seqlens_as_paddle_reads_them(pos: np.ndarray) -> np.ndarray:
    """Reference: Paddle's TensorRT transformer_input_convert plugin (one block per row, one
    thread per position; a position counts when its id equals its index), then the prefix sum."""
    counts = [sum(1 for i in range(pos.shape[1]) if pos[b, i] == i) for b in range(pos.shape[0])]
    return np.concatenate([[0], np.cumsum(counts)])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(1, 999), min_size=1, max_size=20), min_size=1, max_size=30))
def test_position_ids_give_the_padding_free_offsets(seqs):
    """The varlen path must see each sequence's true length: the offsets Paddle derives from our
    position ids equal the cumulative real lengths of the padded batch (padded to multiples of 8,
    as on the GPU)."""
    from pipeline.engine.batching import position_ids

    ids = Ragged.from_lists(seqs)
    types = Ragged.from_lists([[i % 2 for i in range(len(s))] for s in seqs])
    enc = Encoded(ids, types)
    for batch in plan_batches(enc.lengths, 64, 7, 8):
        _, _, mask = pad_batch(enc, batch, pad_id=0)
        pos = position_ids(mask)
        assert pos.shape == mask.shape and pos.dtype == np.int64
        lengths = enc.lengths[batch.rows]
        assert np.array_equal(_cu_seqlens_as_paddle_reads_them(pos), np.concatenate([[0], np.cumsum(lengths)]))
        for r, n in enumerate(lengths):
            assert np.array_equal(pos[r, :n], np.arange(n)) and not pos[r, n:].any()
