"""Grouped prefill (`DecoderPredictor.prefill`): the rows of a left-padded batch run in groups of
similar length, each with only its own columns. Against one [B, S] prefill of the same batch
(`group_prefill=False`): the same logits, the same cache on every real column, zeros (masked)
left of each row's group, and the same logits over the following decode steps."""

import zlib  # noqa: F401 - before paddle

import numpy as np
import pytest

from pipeline.engine.decoder_predictor import DecoderPredictor
from pipeline.engine.generation_batching import left_pad
from tests.engine.test_decoder_select import exported, feed, tokens_for  # noqa: F401 - fixture

LENGTHS = [17, 16, 9, 8, 3, 1]


@pytest.mark.parametrize("call_tokens", [0, 8])
def test_grouped_prefill_equals_one_pass(exported, call_tokens):  # noqa: F811
    cfg, _, out = exported
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in LENGTHS]
    padded = left_pad(prompts, np.arange(len(prompts)), max(LENGTHS), 0)
    whole = DecoderPredictor(out, len(prompts), 64, group_prefill=False)
    grouped = DecoderPredictor(out, len(prompts), 64, prefill_call_tokens=call_tokens)
    groups = grouped.prefill_groups(padded.attention_mask)
    assert len(groups) > 1 and sorted(np.concatenate([r for r, _ in groups]).tolist()) == list(range(6))
    for rows, cols in groups:
        assert cols == max(LENGTHS[i] for i in rows)
    steps = tokens_for(cfg, len(prompts), 5)
    a = feed(whole, padded.input_ids, padded.attention_mask, steps)
    b = feed(grouped, padded.input_ids, padded.attention_mask, steps)
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    S = max(LENGTHS)
    for (ka, va), (kb, vb) in zip(whole.cache, grouped.cache):
        for i, n in enumerate(LENGTHS):
            real = np.r_[S - n:ka.shape[2]]  # the row's prompt columns and the decoded ones
            np.testing.assert_allclose(kb[i, :, real], ka[i, :, real], atol=1e-4, rtol=0)
            np.testing.assert_allclose(vb[i, :, real], va[i, :, real], atol=1e-4, rtol=0)
        group_cols = {i: cols for rows, cols in groups for i in rows}
        for i in range(len(LENGTHS)):
            assert not kb[i, :, :S - group_cols[i]].any() and not vb[i, :, :S - group_cols[i]].any()


def test_one_group_when_splitting_does_not_pay(exported):  # noqa: F811
    _, _, out = exported
    pred = DecoderPredictor(out, 4, 64)  # the default call cost, 128 tokens: never worth it for these
    mask = left_pad([[5] * n for n in (9, 8, 3, 1)], np.arange(4), 9, 0).attention_mask
    assert [(r.tolist(), c) for r, c in pred.prefill_groups(mask)] == [([0, 1, 2, 3], 9)]
    far = left_pad([[5] * n for n in (300, 290, 20, 10)], np.arange(4), 300, 0).attention_mask
    assert [(r.tolist(), c) for r, c in pred.prefill_groups(far)] == [([0, 1], 300), ([2, 3], 20)]
