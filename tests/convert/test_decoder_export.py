"""The exported prefill and decode-step programs (convert/decoder_export.py) run through
`DecoderPredictor` (engine/decoder_predictor.py) against the dynamic-graph decoder.

On a tiny random 2-layer GQA model (4 query heads, 2 key/value heads) and a left-padded batch of
prompts of different lengths: the prefill and 16 decode steps give, at every step, the logits of
one uncached forward pass of the module over prompt + generated tokens (< 1e-4); the greedy
tokens are `greedy_generate`'s; the host cache holds the module's keys and values; and the
programs' inputs and outputs carry the documented names and dims.
"""

import zlib  # noqa: F401 - before paddle

import numpy as np
import paddle
import pytest

from pipeline.convert.decoder import DecoderConfig, greedy_generate, position_ids_from_mask
from pipeline.convert.decoder_export import write_decoder_programs
from pipeline.engine.decoder_io import DECODE_PROGRAM, PARAMS_FILE, PREFILL_PROGRAM, decode_io, prefill_io, program_io_shapes
from pipeline.convert.gguf_checkpoint import expected_shapes
from pipeline.engine.decoder_predictor import DecoderCacheFull, DecoderPredictor
from tests.convert.test_decoder import PROMPT_LENGTHS, TINY, left_padded, ours, random_weights, run

STEPS = 16
ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = DecoderConfig(**TINY)
    model = ours(cfg, random_weights(expected_shapes(cfg), seed=0))
    out = tmp_path_factory.mktemp("decoder")
    sizes = write_decoder_programs(model, out)
    return cfg, model, out, sizes


def predictor_decode(pred: DecoderPredictor, ids, mask, steps):
    """Greedy through the predictor: returns tokens [B, steps], logits [B, steps, V] and the
    capacities the cache went through."""
    pos = position_ids_from_mask(paddle.to_tensor(mask)).numpy()
    logits = [pred.prefill(ids, pos, mask)]
    capacities = [pred.capacity]
    next_pos, tokens = pos[:, -1:] + 1, []
    for _ in range(steps - 1):
        tok = logits[-1].argmax(-1)[:, None]
        tokens.append(tok)
        mask = np.concatenate([mask, np.ones_like(tok)], axis=1)
        live = [k.copy() for k, _ in pred.cache]
        logits.append(pred.step(tok, next_pos, mask))
        # The decode program only reads the cache it shares: the columns it had are untouched.
        assert all(np.array_equal(before, k[:, :, :-1]) for before, (k, _) in zip(live, pred.cache))
        capacities.append(pred.capacity)
        next_pos = next_pos + 1
    tokens.append(logits[-1].argmax(-1)[:, None])
    return np.concatenate(tokens, axis=1), np.stack(logits, axis=1), capacities


def check_against_module(model, pred, ids, mask, steps):
    tokens, step_logits, capacities = predictor_decode(pred, ids, mask, steps)
    full_ids = np.concatenate([ids, tokens[:, :-1]], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens[:, :-1])], axis=1)
    full, cache = run(model, full_ids, full_mask)
    S = ids.shape[1]
    assert np.abs(full[:, S - 1:]).max() > 1.0  # not a degenerate model
    np.testing.assert_allclose(step_logits, full[:, S - 1:], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(tokens, greedy_generate(model, ids, mask, steps).numpy())
    # The host cache: the module's keys (after RoPE) and values on every real column. (Padding
    # columns differ beyond layer 0 and are never attended: a padding query sees no key and
    # averages over the whole call's columns, so its hidden state depends on the call's length.)
    real = full_mask.astype(bool)  # prompt + every token fed back (the last one never is)
    assert pred.length == real.shape[1]
    for (k, v), (want_k, want_v) in zip(pred.cache, cache):
        for got, want in ((k, want_k.numpy()), (v, want_v.numpy())):
            diff = np.abs(got - want).max(axis=(1, 3))  # [B, T]
            assert diff[real].max() < ATOL
    return tokens, step_logits, capacities


@pytest.mark.parametrize("feed,onednn", [("shared", True), ("shared", False), ("copy", True)])
def test_prefill_and_steps_match_full_forward(exported, feed, onednn):
    cfg, model, out, _ = exported
    ids, mask, rows = left_padded(PROMPT_LENGTHS, cfg.vocab_size)
    pred = DecoderPredictor(out, max_batch=len(PROMPT_LENGTHS), max_len=ids.shape[1] + STEPS, threads=1,
                            onednn=onednn, feed=feed, block=4)
    tokens, step_logits, capacities = check_against_module(model, pred, ids, mask, STEPS)
    assert len(set(capacities)) >= 4  # the cache was re-laid out in place several times
    assert capacities[-1] <= pred.max_len
    # Back to 5 generated columns (the cache shrinks in place), then the same tokens again.
    S = ids.shape[1]
    pred.truncate(S + 5)
    assert pred.capacity == pred._capacity_for(S + 6) < capacities[-1]
    pos = position_ids_from_mask(paddle.to_tensor(mask)).numpy()[:, -1:] + 6
    again_mask = np.concatenate([mask, np.ones((len(ids), 6), np.int64)], axis=1)
    again = pred.step(tokens[:, 5:6], pos, again_mask)
    np.testing.assert_allclose(again, step_logits[:, 6], rtol=0, atol=1e-5)
    # The same predictor, a smaller batch and other prompts next (views, shares re-made).
    sub = [rows[1], rows[3]]
    S = max(map(len, sub))
    ids2 = np.zeros((2, S), np.int64)
    mask2 = np.zeros((2, S), np.int64)
    for b, r in enumerate(sub):
        ids2[b, S - len(r):], mask2[b, S - len(r):] = r, 1
    check_against_module(model, pred, ids2, mask2, 6)


def test_program_names_dims_and_files(exported):
    cfg, _, out, sizes = exported
    n, kv, d, V = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.dim_per_head, cfg.vocab_size
    assert sorted(p.name for p in out.iterdir()) == sorted([PREFILL_PROGRAM, DECODE_PROGRAM, PARAMS_FILE])
    assert set(sizes) == {PREFILL_PROGRAM, DECODE_PROGRAM, PARAMS_FILE}
    assert prefill_io(n) == (["input_ids", "position_ids", "attention_mask"],
                             ["logits", "present_key_0", "present_value_0", "present_key_1", "present_value_1"])
    assert decode_io(n) == (["input_ids", "position_ids", "attention_mask",
                             "past_key_0", "past_value_0", "past_key_1", "past_value_1"],
                            ["logits", "new_key_0", "new_value_0", "new_key_1", "new_value_1"])
    pre = program_io_shapes(out / PREFILL_PROGRAM)
    want = {"input_ids": [-1, -1], "position_ids": [-1, -1], "attention_mask": [-1, -1], "logits": [-1, V]}
    want.update({name: [-1, kv, -1, d] for name in prefill_io(n)[1][1:]})
    assert pre == want
    dec = program_io_shapes(out / DECODE_PROGRAM)
    want = {"input_ids": [-1, 1], "position_ids": [-1, 1], "attention_mask": [-1, -1], "logits": [-1, V]}
    want.update({name: [-1, kv, -1, d] for name in decode_io(n)[0][3:]})
    want.update({name: [-1, kv, 1, d] for name in decode_io(n)[1][1:]})
    assert dec == want
    # What Paddle Inference reports, in order (the predictor asserts the same on load).
    from paddle import inference as paddle_infer

    for program, (inputs, outputs) in ((PREFILL_PROGRAM, prefill_io(n)), (DECODE_PROGRAM, decode_io(n))):
        config = paddle_infer.Config(str(out / program), str(out / PARAMS_FILE))
        config.disable_glog_info()
        predictor = paddle_infer.create_predictor(config)
        assert (predictor.get_input_names(), predictor.get_output_names()) == (inputs, outputs)


def test_cache_full_and_shape_checks(exported):
    cfg, _, out, _ = exported
    ids, mask, _ = left_padded([3, 2], cfg.vocab_size)
    pos = position_ids_from_mask(paddle.to_tensor(mask)).numpy()
    pred = DecoderPredictor(out, max_batch=2, max_len=5, block=4)
    with pytest.raises(DecoderCacheFull):
        pred.prefill(np.ones((2, 6), np.int64), np.zeros((2, 6), np.int64), np.ones((2, 6)))
    with pytest.raises(AssertionError, match="batch 3 > max_batch 2"):
        pred.prefill(np.ones((3, 2), np.int64), np.zeros((3, 2), np.int64), np.ones((3, 2)))
    logits = pred.prefill(ids, pos, mask)
    for _ in range(2):  # columns 3 and 4 of 5
        tok = logits.argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(tok)], axis=1)
        logits = pred.step(tok, pos[:, -1:] + mask.shape[1] - 3, mask)
    with pytest.raises(AssertionError, match=r"attention_mask \(2, 4\)"):
        pred.step(tok, pos[:, -1:], mask[:, :4])
    with pytest.raises(DecoderCacheFull):
        pred.step(tok, pos[:, -1:], np.ones((2, 6)))
