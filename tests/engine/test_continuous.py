"""Continuous batching (pipeline/engine/continuous.py) against static batches (decoding.decode_batch).

`SlotLM` is the toy model of test_decoding (`ToyLM`: one attention layer, a real key/value cache
computed row by row, honouring the masks and positions it is fed, and checking that the mask it
is given agrees with the one it holds) plus `insert` and `compact`; it records every call's rows
and columns. Its logits for a row are bitwise the same in any batch, so continuous batching must
give exactly the static results: tokens, float sums and finish reasons. The Paddle check runs the
tiny random decoder's `DecoderPredictor` both ways (scores to float32 tolerance there).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.engine.continuous import SlotPlan, decode_continuous, supports_continuous
from pipeline.engine.decoding import DecodeStats, DecodingSettings, decode_batch
from pipeline.engine.generation_batching import left_pad
from tests.engine.test_decoding import EOS, PAD, SETTINGS, ToyLM


class SlotLM(ToyLM):
    def __init__(self, **kw):
        super().__init__(max_pos=256, **kw)
        self.shapes: list[tuple[str, int, int]] = []  # (call, rows, columns after it)

    def _note(self, kind, rows):
        super()._note(kind, rows)
        self.shapes.append((kind, self.k.shape[0], self.k.shape[1]))

    def insert(self, rows, ids, pos, mask):
        rows = np.asarray(rows)
        n, length = ids.shape
        r_, t = self.mask.shape
        assert ids.dtype == pos.dtype == np.int64 and pos.shape == mask.shape == (n, length) and length <= t
        assert len(set(rows.tolist())) == n and rows.min() >= 0
        grow = max(int(rows.max()) + 1 - r_, 0)
        assert set(r for r in rows.tolist() if r >= r_) == set(range(r_, r_ + grow)), "rows must continue the batch"
        self.k = np.concatenate([self.k, np.zeros((grow, t, self.h))])
        self.v = np.concatenate([self.v, np.zeros((grow, t, self.h))])
        self.mask = np.concatenate([self.mask, np.zeros((grow, t), self.mask.dtype)])
        out = []
        for i, r in enumerate(rows.tolist()):
            self.k[r], self.v[r], self.mask[r] = 0, 0, 0
            self.mask[r, t - length:] = mask[i]
            for j in np.flatnonzero(mask[i]):
                x = self._x(ids[i, j], pos[i, j])
                self.k[r, t - length + j], self.v[r, t - length + j] = x @ self.Wk, x @ self.Wv
            out.append(self._logits_row(r, self._x(ids[i, -1], pos[i, -1])))
        self._note("insert", n)
        return np.stack(out)

    def compact(self, first):
        assert 0 < first < self.k.shape[1]
        self.k, self.v, self.mask = self.k[:, first:], self.v[:, first:], self.mask[:, first:]
        self._note("compact", first)


def sorted_longest_first(prompts):
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


def static(prompts, s, keys):
    order = sorted_longest_first(prompts)
    padded = left_pad(prompts, np.asarray(order), len(prompts[order[0]]), PAD)
    out = decode_batch(ToyLM(max_pos=256), padded, s, row_keys=[keys[i] for i in order])
    return {p: c for p, c in zip(order, out)}


def continuous(prompts, s, keys, slots, admit_min=1, model=None):
    model = model if model is not None else SlotLM()
    order = sorted_longest_first(prompts)
    columns = len(prompts[order[0]]) + s.max_new_tokens
    stats = DecodeStats()
    done = []
    out = decode_continuous(model, prompts, order, s, SlotPlan(slots, columns, slots * s.rows_per_prompt, admit_min),
                            keys, stats=stats, on_done=lambda ps, cs: done.extend(ps))
    assert sorted(done) == list(range(len(prompts))), "on_done names every prompt once"
    return out, stats, model, columns


RNG = np.random.default_rng(3)
MANY = [RNG.integers(3, 12, int(n)).tolist() for n in RNG.integers(1, 9, 23)]  # 23 prompts, 1-8 tokens


@pytest.mark.parametrize("strategy", sorted(SETTINGS))
@pytest.mark.parametrize("slots,admit_min", [(1, 1), (4, 1), (4, 3), (6, 2), (23, 1)])
def test_continuous_gives_exactly_the_static_results(strategy, slots, admit_min):
    s = replace(SETTINGS[strategy], max_new_tokens=14)
    keys = [f"row{i}" for i in range(len(MANY))]
    want = static(MANY, s, keys)
    got, stats, model, columns = continuous(MANY, s, keys, slots, admit_min)
    assert got == want  # tokens, float sums, scores, reasons: bitwise
    reasons = {c.finish_reason for cs in got.values() for c in cs}
    assert reasons == {"eos", "length"}, "prompts must end at different steps for this to test anything"
    # never more rows than slots hold, never more columns than the window's first batch
    assert max(rows for _, rows, _ in model.shapes) <= slots * s.rows_per_prompt
    assert max(cols for _, _, cols in model.shapes) <= columns
    assert stats.prompts == len(MANY) and stats.generated_tokens == sum(c.num_tokens for cs in got.values() for c in cs)
    if slots < len(MANY):
        assert stats.inserts >= 1 and stats.compactions >= 1, "the run must have refilled and compacted"
        assert 1 + stats.inserts == sum(1 for kind, _, _ in model.shapes if kind in ("prefill", "insert"))
        if admit_min == 1 and strategy != "sample":  # (a sample row's row is refilled once n rows are free)
            assert stats.idle_row_steps_waiting == 0, "a finished row ran while prompts waited"
        assert stats.inserted_prompts == len(MANY) - slots


def test_newcomers_are_prefilled_in_groups_of_admit_min():
    s = replace(SETTINGS["greedy"], max_new_tokens=14)
    keys = list(range(len(MANY)))
    _, stats, model, _ = continuous(MANY, s, keys, slots=6, admit_min=3)
    inserted = [n for kind, n in model.calls if kind == "insert"]
    assert inserted and sum(inserted) == len(MANY) - 6
    assert all(n >= 3 for n in inserted[:-1]), inserted  # the last may take the queue's rest
    _, one, model1, _ = continuous(MANY, s, keys, slots=6, admit_min=1)
    assert one.inserts >= stats.inserts


def test_continuous_computes_fewer_idle_rows_than_static():
    """On prompts whose outputs end at very different steps, static batches run finished rows
    (or drop them and run narrower), continuous batches refill them."""
    s = replace(SETTINGS["greedy"], max_new_tokens=14)
    keys = list(range(len(MANY)))
    order = sorted_longest_first(MANY)
    st_static = DecodeStats()
    for lo in range(0, len(order), 6):  # static: batches of 6, as a budget of 6 slots cuts them
        rows = np.asarray(order[lo:lo + 6])
        decode_batch(ToyLM(max_pos=256), left_pad(MANY, rows, len(MANY[rows[0]]), PAD), s, stats=st_static)
    _, st_cont, _, _ = continuous(MANY, s, keys, slots=6)
    assert st_cont.generated_tokens == st_static.generated_tokens
    assert st_cont.step_calls < st_static.step_calls
    useful = st_static.row_steps - st_static.idle_row_steps
    assert st_cont.row_steps - st_cont.idle_row_steps == useful  # the same tokens need the same work


def test_a_step_model_without_insert_is_refused():
    assert not supports_continuous(ToyLM()) and supports_continuous(SlotLM())
    with pytest.raises(AssertionError, match="insert/compact"):
        decode_continuous(ToyLM(), [[3, 4]], [0], SETTINGS["greedy"], SlotPlan(1, 20, 1), [0])


def test_prompts_must_come_longest_first_and_fit_the_columns():
    with pytest.raises(AssertionError, match="longest first"):
        decode_continuous(SlotLM(), [[3], [4, 5]], [0, 1], SETTINGS["greedy"], SlotPlan(1, 20, 1), [0, 1])
    with pytest.raises(AssertionError, match="exceeds"):
        decode_continuous(SlotLM(), [[3, 4]], [0], SETTINGS["greedy"], SlotPlan(1, 5, 1), [0])


# ----------------------------------------------------------------------------- the Paddle predictor


def test_paddle_predictor_continuous_equals_static(tiny_decoder_dir):
    """The real DecoderPredictor's insert/compact on the tiny random decoder: greedy, beam (4
    beams, 2 returned) and seeded sampling give static batching's tokens; scores within 1e-4."""
    from pipeline.engine.decoder_predictor import DecoderPredictor

    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 200, int(n)).tolist() for n in rng.integers(2, 30, 14)]
    order = sorted_longest_first(prompts)
    keys = [f"k{i}" for i in range(len(prompts))]
    longest = len(prompts[order[0]])
    probe = DecoderPredictor(tiny_decoder_dir, len(prompts), longest + 12)
    greedy = decode_batch(probe, left_pad(prompts, np.asarray(order), longest, PAD), DecodingSettings(max_new_tokens=12))
    eos = greedy[0][0].token_ids[3]  # a token the model does generate: rows end at different steps
    cases = [DecodingSettings(max_new_tokens=12, eos_token_ids=(eos,)),
             DecodingSettings(max_new_tokens=10, num_beams=4, num_return_sequences=2, eos_token_ids=(eos,)),
             DecodingSettings(max_new_tokens=12, do_sample=True, top_k=20, temperature=0.8, seed=5,
                              num_return_sequences=2, eos_token_ids=(eos,))]
    for s in cases:
        rows = 4 * s.rows_per_prompt
        pred = DecoderPredictor(tiny_decoder_dir, len(prompts) * s.rows_per_prompt, longest + s.max_new_tokens)
        padded = left_pad(prompts, np.asarray(order), longest, s.pad_token_id)
        want = dict(zip(order, decode_batch(pred, padded, s, row_keys=[keys[i] for i in order])))
        stats = DecodeStats()
        got = decode_continuous(pred, prompts, order, s, SlotPlan(4, longest + s.max_new_tokens, rows), keys,
                                stats=stats)
        assert stats.inserts >= 2 and stats.compactions >= 1, stats
        for p in order:
            assert [c.token_ids for c in got[p]] == [c.token_ids for c in want[p]], (s.resolved_strategy, p)
            assert [c.finish_reason for c in got[p]] == [c.finish_reason for c in want[p]]
            assert [c.sum_logprob for c in got[p]] == pytest.approx([c.sum_logprob for c in want[p]], abs=1e-4)
