"""Decoding over the StepModel interface (pipeline/engine/decoding.py), on a toy numpy model whose
right answers are computed here without its cache, masks, positions or batching:

- `ToyLM`: one attention layer with a real key/value cache behind prefill/step/select, computed
  row by row (so a row's logits are bitwise the same in any batch) and honouring the mask and
  position ids it is given;
- `ToyLM.next_logits(tokens)`: the same function of an unpadded token list, recomputed from
  scratch with positions 0..n-1 (no cache), the reference every expectation is built from.
"""

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from pipeline.engine.decoding import (
    Candidate,
    DecodingSettings,
    decode_batch,
    filter_logits,
    generate,
    log_softmax,
    row_generator,
    sample_tokens,
    top_tokens,
)
from pipeline.engine.generation_batching import GenerationBudget, KVCacheSpec, left_pad
from pipeline.errors import ConfigError

EOS, PAD = 1, 0
PROMPTS = [[5, 9, 3, 7, 2, 8, 4], [6, 2], [3, 3, 9, 5, 10], [11], [7, 4, 2, 6]]


class ToyLM:
    """x_j = E[tok_j] + P[pos_j]; k, v = x Wk, x Wv per token (the cache); the last query attends
    every real cached column; logits = tanh(x + attention) Wo + bias."""

    def __init__(self, vocab=12, hidden=8, max_pos=64, seed=0, scale=2.5, eos_bias=0.0):
        rng = np.random.default_rng(seed)
        h = hidden
        self.vocab, self.h = vocab, h
        self.E = rng.standard_normal((vocab, h))
        self.P = rng.standard_normal((max_pos, h)) * 0.5
        self.Wq, self.Wk, self.Wv = (rng.standard_normal((h, h)) / math.sqrt(h) for _ in range(3))
        self.Wo = rng.standard_normal((h, vocab)) * scale / math.sqrt(h)
        self.bias = np.zeros(vocab)
        self.bias[EOS] = eos_bias
        self.k = self.v = None  # [R, T, H]
        self.mask = None
        self.calls: list[tuple[str, int]] = []
        self.max_cache_tokens = 0  # rows x columns, the most the cache held

    # the reference: no cache, no padding, positions 0..n-1
    def next_logits(self, tokens) -> np.ndarray:
        x = self.E[np.asarray(tokens)] + self.P[np.arange(len(tokens))]
        k, v = x @ self.Wk, x @ self.Wv
        q = x[-1] @ self.Wq
        s = k @ q / math.sqrt(self.h)
        w = np.exp(s - s.max())
        return (np.tanh(x[-1] + (w / w.sum()) @ v) @ self.Wo + self.bias).astype(np.float32)

    # the StepModel
    def _x(self, tok, pos):
        return self.E[tok] + self.P[pos]

    def _logits_row(self, r, x_last):
        real = self.mask[r].astype(bool)
        k, v = self.k[r][real], self.v[r][real]
        s = k @ (x_last @ self.Wq) / math.sqrt(self.h)
        w = np.exp(s - s.max())
        return (np.tanh(x_last + (w / w.sum()) @ v) @ self.Wo + self.bias).astype(np.float32)

    def _note(self, kind, rows):
        self.calls.append((kind, rows))
        self.max_cache_tokens = max(self.max_cache_tokens, self.k.shape[0] * self.k.shape[1])

    def prefill(self, ids, pos, mask):
        assert ids.shape == pos.shape == mask.shape and ids.dtype == pos.dtype == np.int64
        b, n = ids.shape
        self.k, self.v = np.zeros((b, n, self.h)), np.zeros((b, n, self.h))
        for r, j in zip(*np.nonzero(mask)):  # padding columns stay zero and are never attended
            x = self._x(ids[r, j], pos[r, j])
            self.k[r, j], self.v[r, j] = x @ self.Wk, x @ self.Wv
        self.mask = mask.copy()
        self._note("prefill", b)
        return np.stack([self._logits_row(r, self._x(ids[r, -1], pos[r, -1])) for r in range(b)])

    def step(self, ids, pos, mask):
        r_, t = mask.shape
        assert ids.shape == pos.shape == (r_, 1) and self.k.shape[:2] == (r_, t - 1), "cache and mask disagree"
        assert np.array_equal(mask[:, :-1], self.mask) and (mask[:, -1] == 1).all()
        x = self._x(ids[:, 0], pos[:, 0])
        self.k = np.concatenate([self.k, (x @ self.Wk)[:, None]], axis=1)
        self.v = np.concatenate([self.v, (x @ self.Wv)[:, None]], axis=1)
        self.mask = mask.copy()
        self._note("step", r_)
        return np.stack([self._logits_row(r, x[r]) for r in range(r_)])

    def select(self, rows):
        rows = np.asarray(rows)
        assert rows.ndim == 1 and rows.dtype.kind == "i" and len(rows) >= 1 and rows.max() < len(self.k)
        self.k, self.v, self.mask = self.k[rows], self.v[rows], self.mask[rows]


def batch_of(prompts):
    return left_pad(prompts, np.arange(len(prompts)), max(len(p) for p in prompts), PAD)


def run(model, prompts, s, keys=None, decode=None):
    return decode_batch(model, batch_of(prompts), s, row_keys=keys, decode=decode)


def seq_logprob(model, prompt, seq):
    return sum(float(log_softmax(model.next_logits(list(prompt) + list(seq[:t])))[seq[t]]) for t in range(len(seq)))


def lp_score(total, n, lp):
    return total / n ** lp


# ----------------------------------------------------------------------------- greedy


def test_greedy_equals_an_argmax_loop_run_row_by_row():
    model = ToyLM()
    s = DecodingSettings(max_new_tokens=12, eos_token_ids=(EOS,))
    out = run(model, PROMPTS, s)
    reasons = set()
    for prompt, cands in zip(PROMPTS, out):
        seq, total = [], 0.0
        for _ in range(12):
            lp = log_softmax(model.next_logits(prompt + seq))
            seq.append(int(lp.argmax()))
            total += float(lp[seq[-1]])
            if seq[-1] == EOS:
                break
        (c,) = cands
        assert list(c.token_ids) == seq
        assert c.sum_logprob == pytest.approx(total, abs=1e-9)
        assert c.mean_logprob == pytest.approx(total / len(seq), abs=1e-9) and c.score == c.mean_logprob
        assert c.finish_reason == ("eos" if seq[-1] == EOS else "length") and c.num_tokens == len(seq)
        reasons.add(c.finish_reason)
    assert reasons == {"eos", "length"}, "the toy should exercise both endings"


# ----------------------------------------------------------------------------- batch independence

SETTINGS = {
    "greedy": DecodingSettings(max_new_tokens=10, eos_token_ids=(EOS,)),
    "beam": DecodingSettings(max_new_tokens=10, num_beams=3, num_return_sequences=2, eos_token_ids=(EOS,)),
    "sample": DecodingSettings(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=6, top_p=0.9, seed=7,
                               num_return_sequences=2, eos_token_ids=(EOS,)),
}


@pytest.mark.parametrize("strategy", sorted(SETTINGS))
def test_a_rows_output_is_the_same_alone_and_in_a_mixed_length_batch(strategy):
    model, s = ToyLM(), SETTINGS[strategy]
    together = run(model, PROMPTS, s, keys=list(range(len(PROMPTS))))
    alone = [run(model, [p], s, keys=[i])[0] for i, p in enumerate(PROMPTS)]
    assert together == alone  # exact: tokens, float sums and reasons
    reordered = run(model, PROMPTS[::-1], s, keys=list(range(len(PROMPTS)))[::-1])
    assert reordered[::-1] == together


@pytest.mark.parametrize("strategy", sorted(SETTINGS))
def test_dropping_finished_rows_changes_no_result_and_saves_compute(strategy):
    s = SETTINGS[strategy]
    dropped, kept = ToyLM(), ToyLM()
    a = run(dropped, PROMPTS, s)
    b = run(kept, PROMPTS, replace(s, drop_finished=False))
    assert a == b
    width = len(PROMPTS) * s.rows_per_prompt
    assert all(n == width for kind, n in kept.calls if kind == "step")
    rows_dropped = [n for kind, n in dropped.calls if kind == "step"]
    assert sum(rows_dropped) < sum(n for kind, n in kept.calls if kind == "step")
    if strategy != "beam":
        assert rows_dropped == sorted(rows_dropped, reverse=True), "independent rows only ever leave"


# ----------------------------------------------------------------------------- beam search


def test_beam_search_with_one_beam_is_greedy():
    model = ToyLM()
    for es in (False, True):
        beam = run(model, PROMPTS, DecodingSettings(max_new_tokens=10, strategy="beam", num_beams=1,
                                                    early_stopping=es, eos_token_ids=(EOS,)))
        assert beam == run(model, PROMPTS, SETTINGS["greedy"])


def all_sequences(vocab, n):
    """Every sequence a search may return: ended by EOS at any length <= n, or n long without it."""
    words = [t for t in range(vocab) if t != EOS]
    for length in range(1, n + 1):
        for body in itertools.product(words, repeat=length - 1):
            yield body + (EOS,)
        if length == n:
            yield from itertools.product(words, repeat=n)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -0.5])
def test_beam_search_equals_exhaustive_search_on_a_tiny_vocab(length_penalty):
    vocab, n = 4, 3
    model = ToyLM(vocab=vocab, seed=3, scale=1.5)
    prompts = [[2, 3, 2], [3]]
    # 36 beams hold every candidate at every step, so beam search is exact here
    s = DecodingSettings(max_new_tokens=n, num_beams=36, num_return_sequences=3, length_penalty=length_penalty,
                         early_stopping="never", eos_token_ids=(EOS,))
    for prompt, cands in zip(prompts, run(model, prompts, s)):
        scored = []
        for seq in all_sequences(vocab, n):
            total = seq_logprob(model, prompt, seq)
            scored.append((lp_score(total, len(seq), length_penalty), seq, total))
        scored.sort(key=lambda x: -x[0])
        assert [c.token_ids for c in cands] == [seq for _, seq, _ in scored[:3]]
        for c, (score, seq, total) in zip(cands, scored):
            assert c.score == pytest.approx(score, abs=1e-9) and c.sum_logprob == pytest.approx(total, abs=1e-9)
            assert c.finish_reason == ("eos" if seq[-1] == EOS else "length")


def hf_beam_search(model, prompt, k, n, lp, early, eos=EOS):
    """Hugging Face's beam search for one prompt, written plainly from its BeamSearchScorer:
    num_beams copies of the prompt, all but the first at -1e9; 2 x num_beams candidates a step;
    an EOS among the first num_beams ends a hypothesis (length counts the EOS); is_done by the
    early_stopping rule; the open beams join at the end."""
    beams = [((), 0.0 if b == 0 else -1e9) for b in range(k)]
    hyps, worst = [], 1e9

    def add(seq, total):
        nonlocal worst
        score = total / len(seq) ** lp
        if len(hyps) < k or score > worst:
            hyps.append((score, seq, total))
            if len(hyps) > k:
                hyps.sort(key=lambda h: h[0])
                hyps.pop(0)
                worst = hyps[0][0]
            else:
                worst = min(worst, score)

    for t in range(1, n + 1):
        cands = []
        for b, (seq, total) in enumerate(beams):
            lp_next = log_softmax(model.next_logits(list(prompt) + list(seq)))
            cands += [(total + float(lp_next[tok]), b * model.vocab + tok, seq + (tok,)) for tok in range(model.vocab)]
        cands.sort(key=lambda c: (-c[0], c[1]))
        cands = cands[:2 * k]
        nxt = []
        for rank, (total, _, seq) in enumerate(cands):
            if seq[-1] == eos:
                if rank < k:
                    add(seq, total)
            else:
                nxt.append((seq, total))
            if len(nxt) == k:
                break
        beams = nxt
        if len(hyps) >= k:
            best = cands[0][0]
            if early is True:
                return sorted(hyps, key=lambda h: -h[0])
            length = n if (early == "never" and lp > 0) else t
            if worst >= best / length ** lp:
                return sorted(hyps, key=lambda h: -h[0])
    for seq, total in beams:
        add(seq, total)
    return sorted(hyps, key=lambda h: -h[0])


def test_beam_search_follows_hugging_faces_rules():
    model = ToyLM(vocab=7, seed=12, scale=1.2)
    k, n = 3, 8
    prompts = [[t % 7 for t in p] for p in PROMPTS[:4]]
    ends, outcomes = set(), {}
    for lp, early in itertools.product([1.0, 0.3, 2.0], [False, True, "never"]):
        s = DecodingSettings(max_new_tokens=n, num_beams=k, num_return_sequences=k, length_penalty=lp,
                             early_stopping=early, eos_token_ids=(EOS,))
        got = run(model, prompts, s)
        for prompt, cands in zip(prompts, got):
            want = hf_beam_search(model, prompt, k, n, lp, early)
            assert [c.token_ids for c in cands] == [seq for _, seq, _ in want[:k]], (lp, early)
            assert [c.score for c in cands] == pytest.approx([sc for sc, _, _ in want[:k]], abs=1e-9)
            ends |= {c.finish_reason for c in cands}
        outcomes.setdefault(lp, set()).add(str(got))
    assert ends == {"eos", "length"}
    assert len(outcomes[1.0]) == 3, "True, False and 'never' should each give other results here"


# ----------------------------------------------------------------------------- sampling


def test_sampling_depends_on_seed_and_row_only():
    model, s = ToyLM(), SETTINGS["sample"]
    keys = ["a", "b", "c", "d", "e"]
    base = run(model, PROMPTS, s, keys=keys)
    assert run(model, PROMPTS, s, keys=keys) == base
    perm = [3, 0, 4, 2, 1]
    shuffled = run(model, [PROMPTS[i] for i in perm], s, keys=[keys[i] for i in perm])
    assert [shuffled[perm.index(i)] for i in range(5)] == base
    other = run(model, PROMPTS, replace(s, seed=8), keys=keys)
    assert other != base and sum(o != b for o, b in zip(other, base)) >= 3
    # a row's two samples differ from each other, and the row's stream is its own
    assert any(c[0].token_ids != c[1].token_ids for c in base)
    assert row_generator(7, "a", 0).random() == row_generator(7, "a", 0).random() != row_generator(7, "a", 1).random()
    assert row_generator(7, 3).random() != row_generator(7, "3").random()


def test_top_k_one_sampling_is_greedy():
    model = ToyLM()
    greedy = run(model, PROMPTS, SETTINGS["greedy"])
    for temperature in (0.5, 1.0, 3.0):
        sampled = run(model, PROMPTS, DecodingSettings(max_new_tokens=10, do_sample=True, top_k=1, seed=1,
                                                       temperature=temperature, eos_token_ids=(EOS,)))
        assert sampled == greedy  # log-probabilities are the model's, not the warped ones


def hf_top_p_keep(logits, top_p):
    """HF's TopPLogitsWarper: sort ascending, drop tokens whose cumulative mass <= 1 - top_p, keep one."""
    order = np.argsort(logits)
    p = np.exp(logits[order] - logits.max())
    cum = np.cumsum(p / p.sum())
    drop = cum <= 1 - top_p
    drop[-1] = False
    keep = np.ones(len(logits), bool)
    keep[order[drop]] = False
    return keep


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    logits = np.log(np.array([[0.05, 0.5, 0.15, 0.3]]))
    keep = lambda **kw: np.isfinite(filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert keep(top_k=2) == [False, True, False, True]
    assert keep(top_k=4) == keep(top_k=0) == keep(top_p=1.0) == [True] * 4
    assert keep(top_p=0.75) == [False, True, False, True]  # 0.5 < 0.75, 0.5 + 0.3 reaches it
    assert keep(top_p=0.85) == [False, True, True, True]
    assert keep(top_p=0.1) == [False, True, False, False]  # always at least one
    assert keep(top_k=3, top_p=0.8) == [False, True, False, True]  # top-p over the top-k renormalised
    tied = np.array([[1.0, 2.0, 2.0, 0.5]])
    assert np.isfinite(filter_logits(tied, top_k=1))[0].tolist() == [False, True, True, False]  # HF keeps ties
    np.testing.assert_allclose(filter_logits(logits, temperature=0.5), logits / 0.5)
    rng = np.random.default_rng(0)
    for _ in range(200):
        x = rng.standard_normal(20) * rng.uniform(0.5, 4)
        k, p = int(rng.integers(0, 21)), float(rng.uniform(0.05, 1.0))
        want = np.ones(20, bool)
        if 0 < k < 20:
            want &= x >= np.sort(x)[-k]
        xk = np.where(want, x, -np.inf)
        if p < 1:
            want &= hf_top_p_keep(xk, p)
        assert np.isfinite(filter_logits(x[None], top_k=k, top_p=p))[0].tolist() == want.tolist()


def test_filters_on_a_large_vocabulary_search_past_the_first_candidates():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 5000)) * np.array([[0.3], [1.0], [3.0], [8.0]])  # flat to peaked
    for p in (0.2, 0.9, 0.99):
        for k in (0, 40, 300):
            want = np.ones_like(x, dtype=bool)
            if k:
                want &= x >= np.sort(x, axis=-1)[:, -k:-k + 1]
            xk = np.where(want, x, -np.inf)
            want &= np.stack([hf_top_p_keep(row, p) for row in xk])
            got = np.isfinite(filter_logits(x, top_k=k, top_p=p))
            assert (got == want).all(), (p, k)
    assert np.isfinite(filter_logits(x, top_p=0.99)).sum(axis=-1)[0] > 1000  # the flat row's nucleus


def test_top_tokens_orders_by_value_then_id():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 30, (5, 200)).astype(np.float32)  # many ties
    for n in (1, 7, 32, 33, 60, 200):
        want = np.stack([sorted(range(200), key=lambda i: (-row[i], i))[:n] for row in x])
        assert (top_tokens(x, n) == want).all(), n


def test_inverse_cdf_draws_follow_the_distribution_and_never_pick_a_removed_token():
    y = np.log(np.array([0.05, 0.5, 0.3, 0.15]))[None].repeat(20000, 0)
    keep = np.tile([True, False, True, True], (20000, 1))  # token 1 filtered out: 0.05, 0.3, 0.15 renormalised
    u = np.random.default_rng(0).random(20000)
    freq = np.bincount(sample_tokens(y, keep, u), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.1, 0.0, 0.6, 0.3], atol=0.015)
    assert sample_tokens(y[:2], keep[:2], np.array([0.0, 0.999999])).tolist() == [0, 3]
    freq = np.bincount(sample_tokens(y, None, u), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.05, 0.5, 0.3, 0.15], atol=0.015)


# ----------------------------------------------------------------------------- endings


def test_max_new_tokens_and_stop_strings():
    model = ToyLM()
    decode = lambda ids: "".join("abcdefghijkl"[t] for t in ids)  # noqa: E731
    free = run(model, PROMPTS, DecodingSettings(max_new_tokens=16))
    assert all(c[0].num_tokens == 16 and c[0].finish_reason == "length" for c in free)
    texts = [decode(c[0].token_ids) for c in free]
    stops = tuple(sorted({t[3:5] for t in texts[:3]}))  # stop strings that occur in some rows
    stopped = run(model, PROMPTS, DecodingSettings(max_new_tokens=16, stop_strings=stops), decode=decode)
    seen_stop = False
    for text, (c,) in zip(texts, stopped):
        ends = [text.find(st) + len(st) for st in stops if st in text]
        if ends:  # the first token that completes a stop string ends the row
            assert c.finish_reason == "stop" and decode(c.token_ids) == text[:min(ends)]
            assert c.stop_string in stops and c.stop_string in decode(c.token_ids)
            seen_stop = True
        else:
            assert c.finish_reason == "length" and decode(c.token_ids) == text
    assert seen_stop
    beams = run(model, PROMPTS, DecodingSettings(max_new_tokens=8, num_beams=3, num_return_sequences=3,
                                                 stop_strings=stops), decode=decode)
    for cands in beams:  # a stop string ends a hypothesis as EOS would: nothing runs past one
        for c in cands:
            text = decode(c.token_ids)
            assert (c.finish_reason == "stop") == any(st in text for st in stops)
            assert not any(st in text[:-1] for st in stops)
            assert c.finish_reason == "stop" or c.num_tokens == 8
    with pytest.raises(ConfigError, match="decode callback"):
        run(model, PROMPTS, DecodingSettings(max_new_tokens=4, stop_strings=("a",)))


def test_settings_refuse_what_cannot_be_decoded():
    for bad in (dict(max_new_tokens=0), dict(num_beams=2, num_return_sequences=3), dict(num_return_sequences=2),
                dict(do_sample=True, num_beams=2), dict(do_sample=True, temperature=0.0), dict(top_p=0.0),
                dict(early_stopping="sometimes"), dict(top_k=-1)):
        with pytest.raises(ConfigError):
            DecodingSettings(**bad)
    assert DecodingSettings(num_beams=4).rows_per_prompt == 4
    assert DecodingSettings(do_sample=True, num_return_sequences=3).rows_per_prompt == 3
    assert DecodingSettings().rows_per_prompt == 1


# ----------------------------------------------------------------------------- the whole path


@pytest.mark.parametrize("strategy", sorted(SETTINGS))
def test_generate_on_a_tight_budget_gives_what_one_big_batch_gives_in_input_order(strategy):
    s = SETTINGS[strategy]
    rng = np.random.default_rng(4)
    prompts = [rng.integers(2, 12, int(n)).tolist() for n in rng.integers(1, 12, 23)]
    kv = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, bytes_per_value=8)  # the toy's float64 k, v
    budget = GenerationBudget(kv, max_cache_bytes=(11 + s.max_new_tokens) * 3 * s.rows_per_prompt * kv.bytes_per_token,
                              max_batch_rows=64, window=10)
    model = ToyLM()
    got, stats = generate(model, prompts, s, budget)
    assert stats.batches >= 8 and stats.prompts == 23
    assert stats.prompt_tokens == sum(map(len, prompts)) <= stats.padded_prompt_tokens
    # the cache never outgrew the plan (its last token is never fed, so it stays a column short)
    assert model.max_cache_tokens * kv.bytes_per_token <= budget.max_cache_bytes
    want = run(ToyLM(), prompts, s, keys=list(range(23)))
    assert got == want
    assert stats.generated_tokens == sum(c.num_tokens for cands in got for c in cands)
    assert all(isinstance(c, Candidate) and len(cands) == s.num_return_sequences for cands in got for c in cands)


# ----------------------------------------------------------------------------- the Paddle decoder


class DygraphStepModel:
    """`DecoderForCausalLM` (dynamic graph) behind the StepModel interface."""

    def __init__(self, model):
        import paddle

        self.paddle, self.model, self.cache = paddle, model, None

    def _call(self, ids, pos, mask):
        p = self.paddle
        with p.no_grad():
            logits, self.cache = self.model(p.to_tensor(ids), p.to_tensor(pos), p.to_tensor(mask), self.cache)
        return logits[:, -1].numpy()

    def prefill(self, ids, pos, mask):
        self.cache = None
        return self._call(ids, pos, mask)

    def step(self, ids, pos, mask):
        return self._call(ids, pos, mask)

    def select(self, rows):
        idx = self.paddle.to_tensor(np.asarray(rows, dtype=np.int64))
        self.cache = [(self.paddle.gather(k, idx), self.paddle.gather(v, idx)) for k, v in self.cache]


def test_greedy_through_the_paddle_decoder_equals_greedy_generate():
    pytest.importorskip("paddle")
    from pipeline.convert.decoder import DecoderConfig, DecoderForCausalLM, greedy_generate
    from tests.convert.test_decoder import TINY, random_weights

    cfg = DecoderConfig(**TINY)
    model = DecoderForCausalLM(cfg)
    model.load_weights(random_weights(model.expected_shapes()))
    model.eval()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (9, 3, 6, 1)]
    padded = batch_of(prompts)
    want = greedy_generate(model, padded.input_ids, padded.attention_mask, 12).numpy()
    got = decode_batch(DygraphStepModel(model), padded, DecodingSettings(max_new_tokens=12))
    assert [list(c[0].token_ids) for c in got] == want.tolist()
    # and with EOS: rows end at different steps and leave the batch
    eos = int(want[0, 3])
    ended = decode_batch(DygraphStepModel(model), padded, DecodingSettings(max_new_tokens=12, eos_token_ids=(eos,)))
    for row, (c,) in zip(want.tolist(), ended):
        n = row.index(eos) + 1 if eos in row else 12
        assert list(c.token_ids) == row[:n] and c.finish_reason == ("eos" if eos in row else "length")
    assert {c[0].finish_reason for c in ended} == {"eos", "length"}
    # beam search: a prompt alone and in the mixed-length batch (float32: sums agree to rounding)
    s = DecodingSettings(max_new_tokens=12, num_beams=3, num_return_sequences=3, eos_token_ids=(eos,))
    together = decode_batch(DygraphStepModel(model), padded, s)
    for prompt, cands in zip(prompts, together):
        (alone,) = decode_batch(DygraphStepModel(model), batch_of([prompt]), s)
        assert [c.token_ids for c in alone] == [c.token_ids for c in cands]
        assert [c.sum_logprob for c in alone] == pytest.approx([c.sum_logprob for c in cands], abs=1e-4)


def test_finished_rows_are_dropped_lazily_a_quarter_at_a_time():
    """Each gather that drops finished rows drops at least a quarter of the cache rows (a gather
    copies every layer's live columns); until then they are fed padding in place. (Dropping
    eagerly, these 16 prompts step 14, 8, 6, 5, ... rows: 6 -> 5 is a drop of one sixth.)"""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 12, rng.integers(1, 8)).tolist() for _ in range(16)]
    model = ToyLM()
    lazy = run(model, prompts, replace(SETTINGS["greedy"], max_new_tokens=30))
    widths = [n for kind, n in model.calls if kind == "step"]
    drops = [(a, b) for a, b in zip(widths, widths[1:]) if b < a]
    assert len(drops) >= 4, widths
    assert all(a - b >= 0.25 * a for a, b in drops), widths
    assert lazy == run(ToyLM(), prompts, replace(SETTINGS["greedy"], max_new_tokens=30, drop_finished=False))
