"""`DecoderPredictor.select(rows)` (engine/decoder_predictor.py): after a gather of cache rows
(repeats and drops allowed), stepping must give the logits of a fresh predictor prefilled with
just those prompts and fed the same tokens, and the cache views must be the gathered rows.

On the tiny random export of tests/convert/test_decoder_export.py (2 layers, GQA), a batch of 4
left-padded prompts; `block=4` makes the cache re-lay out every 4 columns, so selects land
before, at and after a capacity change.
"""

import zlib  # noqa: F401 - before paddle

import numpy as np
import pytest

from pipeline.convert.decoder import DecoderConfig
from pipeline.convert.decoder_export import write_decoder_programs
from pipeline.convert.gguf_checkpoint import expected_shapes
from pipeline.engine.decoder_predictor import DecoderPredictor
from pipeline.engine.generation_batching import position_ids_from_mask
from tests.convert.test_decoder import PROMPT_LENGTHS, TINY, left_padded, ours, random_weights, run

ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = DecoderConfig(**TINY)
    model = ours(cfg, random_weights(expected_shapes(cfg), seed=0))
    out = tmp_path_factory.mktemp("decoder_select")
    write_decoder_programs(model, out)
    return cfg, model, out


def tokens_for(cfg, rows, steps, seed=5):
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, (rows, steps)).astype(np.int64)


def feed(pred, ids, mask, tokens):
    """Prefill, then one step per column of `tokens`; the logits of every call [B, 1 + n, V]."""
    pos = position_ids_from_mask(mask)
    out = [pred.prefill(ids, pos, mask)]
    next_pos = pos[:, -1:] + 1
    for j in range(tokens.shape[1]):
        mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], axis=1)
        out.append(pred.step(tokens[:, j:j + 1], next_pos + j, mask))
    return np.stack(out, axis=1)


def continue_steps(pred, mask, next_pos, tokens):
    out = []
    for j in range(tokens.shape[1]):
        mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], axis=1)
        out.append(pred.step(tokens[:, j:j + 1], next_pos + j, mask))
    return np.stack(out, axis=1), mask


@pytest.mark.parametrize("feed_mode", ["shared", "copy"])
@pytest.mark.parametrize("block,steps_before", [(32, 2), (4, 2), (4, 3), (4, 4), (4, 6)])
def test_select_then_step_matches_a_fresh_predictor(exported, feed_mode, block, steps_before):
    cfg, model, out = exported
    ids, mask, _ = left_padded(PROMPT_LENGTHS, cfg.vocab_size)
    S, B = ids.shape[1], len(ids)
    after = 3
    max_len = S + steps_before + after + 1
    before_tok = tokens_for(cfg, B, steps_before)
    rows = np.array([2, 0, 0])
    after_tok = tokens_for(cfg, len(rows), after, seed=6)  # the two copies of row 0 diverge

    pred = DecoderPredictor(out, max_batch=B, max_len=max_len, block=block, feed=feed_mode)
    first = feed(pred, ids, mask, before_tok)
    capacity_before = pred.capacity
    cache_before = [(k.copy(), v.copy()) for k, v in pred.cache]
    pred.select(rows)
    assert pred.batch == len(rows) and pred.length == S + steps_before
    for (k, v), (k0, v0) in zip(pred.cache, cache_before):
        np.testing.assert_array_equal(k, k0[rows])
        np.testing.assert_array_equal(v, v0[rows])
    sel_mask = np.concatenate([mask, np.ones((B, steps_before), np.int64)], axis=1)[rows]
    next_pos = position_ids_from_mask(mask)[rows, -1:] + 1 + steps_before
    got, _ = continue_steps(pred, sel_mask, next_pos, after_tok)

    fresh = DecoderPredictor(out, max_batch=B, max_len=max_len, block=block, feed=feed_mode)
    want = feed(fresh, ids[rows], mask[rows], np.concatenate([before_tok[rows], after_tok], axis=1))
    np.testing.assert_allclose(first[rows], want[:, :steps_before + 1], rtol=0, atol=ATOL)
    np.testing.assert_allclose(got, want[:, steps_before + 1:], rtol=0, atol=ATOL)
    assert np.abs(got[1] - got[2]).max() > 1e-2  # the copies really went separate ways
    for (k, v), (k1, v1) in zip(pred.cache, fresh.cache):
        real = np.concatenate([mask[rows], np.ones((len(rows), steps_before + after), np.int64)], axis=1).astype(bool)
        assert np.abs(k - k1).max(axis=(1, 3))[real].max() < ATOL
        assert np.abs(v - v1).max(axis=(1, 3))[real].max() < ATOL
    if block == 4:  # re-laid out after the select (steps_before 2, 3), before it (4), or both (6)
        assert pred.capacity > capacity_before or steps_before == 4
        assert capacity_before > pred._capacity_for(S + 1) or steps_before < 4

    # the independent reference: one uncached forward pass of the module over the whole sequence
    full_ids = np.concatenate([ids[rows], before_tok[rows], after_tok], axis=1)
    full_mask = np.concatenate([mask[rows], np.ones((len(rows), steps_before + after), np.int64)], axis=1)
    full, _ = run(model, full_ids, full_mask)
    np.testing.assert_allclose(got, full[:, S + steps_before:S + steps_before + after], rtol=0, atol=ATOL)


def test_select_can_grow_the_batch_within_max_batch(exported):
    cfg, model, out = exported
    ids, mask, _ = left_padded([5, 2], cfg.vocab_size, seed=3)
    S = ids.shape[1]
    tok = tokens_for(cfg, 2, 5)
    rows = np.array([1, 1, 0, 1])
    after = tokens_for(cfg, 4, 2, seed=9)
    pred = DecoderPredictor(out, max_batch=4, max_len=S + 8, block=4)
    feed(pred, ids, mask, tok)  # length S + 5: past a re-layout
    pred.select(rows)
    sel_mask = np.concatenate([mask, np.ones((2, 5), np.int64)], axis=1)[rows]
    got, _ = continue_steps(pred, sel_mask, position_ids_from_mask(mask)[rows, -1:] + 6, after)
    fresh = DecoderPredictor(out, max_batch=4, max_len=S + 8, block=4)
    want = feed(fresh, ids[rows], mask[rows], np.concatenate([tok[rows], after], axis=1))
    np.testing.assert_allclose(got, want[:, 6:], rtol=0, atol=ATOL)


def test_select_twice_and_drop_rows(exported):
    cfg, _, out = exported
    ids, mask, _ = left_padded(PROMPT_LENGTHS, cfg.vocab_size)
    S = ids.shape[1]
    tok = tokens_for(cfg, 4, 3)
    pred = DecoderPredictor(out, max_batch=4, max_len=S + 8, block=4)
    feed(pred, ids, mask, tok[:, :2])
    pred.select(np.array([3, 1, 2]))
    m = np.concatenate([mask, np.ones((4, 2), np.int64)], axis=1)[[3, 1, 2]]
    pos = position_ids_from_mask(mask)[[3, 1, 2], -1:] + 3
    _, m = continue_steps(pred, m, pos, tok[[3, 1, 2], 2:3])
    pred.select(np.array([2, 0]))  # prompts 2 and 3
    got, _ = continue_steps(pred, m[[2, 0]], pos[[2, 0]] + 1, tokens_for(cfg, 2, 2, seed=11))
    fresh = DecoderPredictor(out, max_batch=4, max_len=S + 8, block=4)
    want = feed(fresh, ids[[2, 3]], mask[[2, 3]],
                np.concatenate([tok[[2, 3]], tokens_for(cfg, 2, 2, seed=11)], axis=1))
    np.testing.assert_allclose(got, want[:, 4:], rtol=0, atol=ATOL)


def test_identity_select_changes_nothing(exported):
    cfg, _, out = exported
    ids, mask, _ = left_padded(PROMPT_LENGTHS, cfg.vocab_size)
    pred = DecoderPredictor(out, max_batch=4, max_len=ids.shape[1] + 4, block=4)
    feed(pred, ids, mask, tokens_for(cfg, 4, 2))
    before = [(k.copy(), v.copy()) for k, v in pred.cache]
    pred.select(np.arange(4))
    for (k, v), (k0, v0) in zip(pred.cache, before):
        np.testing.assert_array_equal(k, k0)
        np.testing.assert_array_equal(v, v0)


def test_select_checks_its_rows(exported):
    cfg, _, out = exported
    ids, mask, _ = left_padded([3, 2], cfg.vocab_size)
    pred = DecoderPredictor(out, max_batch=3, max_len=8, block=4)
    with pytest.raises(AssertionError, match="select before prefill"):
        pred.select(np.array([0]))
    feed(pred, ids, mask, tokens_for(cfg, 2, 1))
    with pytest.raises(AssertionError, match="outside the batch of 2"):
        pred.select(np.array([0, 2]))
    with pytest.raises(AssertionError, match="outside the batch"):
        pred.select(np.array([-1]))
    with pytest.raises(AssertionError, match="between 1 and max_batch 3"):
        pred.select(np.array([], np.int64))
    with pytest.raises(AssertionError, match="between 1 and max_batch 3"):
        pred.select(np.array([0, 1, 0, 1]))
    with pytest.raises(AssertionError):
        pred.select(np.array([[0, 1]]))
    assert pred.batch == 2  # a refused select leaves the cache as it was
