"""The generation engine (pipeline/engine/generator.py) over a numpy StepModel.

`SumLM`: a row's logits are a fixed function of that row's own real tokens only (the last
token's row of a random table plus the sum of the embeddings of all its real tokens, computed
row by row), kept behind a real prefill/step/select cache of token lists that checks the masks
it is fed. So results must not depend on batching or streams, and `reference_greedy` (the same
function of the unpadded token list, no cache) gives the expected tokens independently.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.cancel import CancelToken, Cancelled
from pipeline.engine.decoding import DecodingSettings, log_softmax
from pipeline.engine.generator import Generator, GeneratorSettings

VOCAB, HIDDEN, EOS, PAD = 16, 6, 1, 0
_rng = np.random.default_rng(7)
E = _rng.standard_normal((VOCAB, HIDDEN))
W = _rng.standard_normal((HIDDEN, VOCAB))
LAST = _rng.standard_normal((VOCAB, VOCAB)) * 2.0
LAST[:, EOS] += 0.5  # EOS now and then: some rows finish early, others run to the length


def logits_of(tokens) -> np.ndarray:
    h = np.zeros(HIDDEN)
    for t in tokens:
        h = h + E[int(t)]
    return (LAST[int(tokens[-1])] + np.tanh(h) @ W).astype(np.float32)


class SumLM:
    """A StepModel whose cache is, per row, the list of its real tokens."""

    def __init__(self, max_rows: int, max_len: int, threads: int):
        self.max_rows, self.max_len, self.threads = max_rows, max_len, threads
        self.rows: list[list[int]] = []
        self.mask = None
        self.calls = {"prefill": 0, "step": 0, "select": 0}
        self.thread_ids: set[int] = set()
        self.busy = False

    def _enter(self):
        assert not self.busy, "one caller at a time"
        self.busy = True
        self.thread_ids.add(threading.get_ident())

    def prefill(self, ids, pos, mask):
        self._enter()
        try:
            b, n = ids.shape
            assert ids.dtype == pos.dtype == np.int64 and pos.shape == mask.shape == (b, n)
            assert b <= self.max_rows and n <= self.max_len
            self.calls["prefill"] += 1
            self.mask = mask.astype(np.int64).copy()
            self.rows = []
            for r in range(b):
                real = mask[r].astype(bool)
                assert real[-1] and np.array_equal(pos[r][real], np.arange(real.sum()))  # left padded
                self.rows.append([int(t) for t in ids[r][real]])
            return np.stack([logits_of(t) for t in self.rows])
        finally:
            self.busy = False

    def step(self, ids, pos, mask):
        self._enter()
        try:
            r_ = len(self.rows)
            assert ids.shape == pos.shape == (r_, 1) and mask.shape == (r_, self.mask.shape[1] + 1)
            assert mask.shape[1] <= self.max_len
            assert np.array_equal(mask[:, :-1], self.mask) and (mask[:, -1] == 1).all()
            self.calls["step"] += 1
            self.mask = mask.copy()
            for r in range(r_):
                assert pos[r, 0] == len(self.rows[r])
                self.rows[r] = self.rows[r] + [int(ids[r, 0])]
            return np.stack([logits_of(t) for t in self.rows])
        finally:
            self.busy = False

    def select(self, rows):
        rows = np.asarray(rows)
        assert rows.ndim == 1 and len(rows) >= 1 and rows.min() >= 0 and rows.max() < len(self.rows)
        self.calls["select"] += 1
        self.rows = [list(self.rows[int(r)]) for r in rows]
        self.mask = self.mask[rows]

    # continuous batching
    def insert(self, rows, ids, pos, mask):
        self._enter()
        try:
            rows = np.asarray(rows)
            n, length = ids.shape
            t = self.mask.shape[1]
            assert ids.dtype == pos.dtype == np.int64 and pos.shape == mask.shape == (n, length) and length <= t
            assert len(set(rows.tolist())) == n
            grow = max(int(rows.max()) + 1 - len(self.rows), 0)
            assert len(self.rows) + grow <= self.max_rows
            assert set(r for r in rows.tolist() if r >= len(self.rows)) == set(range(len(self.rows), len(self.rows) + grow))
            self.calls["insert"] = self.calls.get("insert", 0) + 1
            self.rows += [[] for _ in range(grow)]
            self.mask = np.concatenate([self.mask, np.zeros((grow, t), np.int64)])
            out = []
            for k, r in enumerate(rows.tolist()):
                real = mask[k].astype(bool)
                assert real[-1] and np.array_equal(pos[k][real], np.arange(real.sum()))
                self.rows[r] = [int(x) for x in ids[k][real]]
                self.mask[r] = 0
                self.mask[r, t - length:] = mask[k]
                out.append(logits_of(self.rows[r]))
            return np.stack(out)
        finally:
            self.busy = False

    def compact(self, first):
        assert 0 < first < self.mask.shape[1]
        self.calls["compact"] = self.calls.get("compact", 0) + 1
        self.mask = self.mask[:, first:]


def reference_greedy(prompt, max_new, eos=EOS):
    seq, out, lp = list(prompt), [], 0.0
    for _ in range(max_new):
        x = logits_of(seq).astype(np.float64)
        t = int(np.argmax(x))
        lp += float(log_softmax(x[None])[0, t])
        out.append(t)
        seq.append(t)
        if t == eos:
            break
    return out, lp


PROMPTS = [[3, 5, 7], [2], [9, 9, 4, 8, 6, 11], [12, 3], [5, 5, 5, 5], [14], [7, 10, 2, 13, 4], [6, 6]]
MAX_PROMPT = 8
MODEL = SimpleNamespace(path=None, num_hidden_layers=1, num_key_value_heads=1, head_dim=1, max_seq_len=64, meta={})
BYTES_PER_TOKEN = 1 * 2 * 1 * 1 * 4


def make(decoding: DecodingSettings, *, cache_tokens=10_000, rows=64, threads=1, streams=1, window=None,
         models: list | None = None, batching="static", admit_min=1) -> Generator:
    def backend(max_rows, max_len, threads_):
        m = SumLM(max_rows, max_len, threads_)
        if models is not None:
            models.append(m)
        return m

    s = GeneratorSettings(decoding, cache_tokens * BYTES_PER_TOKEN, rows, MAX_PROMPT, threads=threads,
                          streams=streams, window=window, batching=batching, admit_min=admit_min)
    return Generator(MODEL, s, backend=backend)


GREEDY = DecodingSettings(max_new_tokens=6, eos_token_ids=(EOS,), pad_token_id=PAD)
SAMPLE = DecodingSettings(max_new_tokens=5, do_sample=True, num_return_sequences=2, top_k=8, temperature=0.9,
                          seed=3, eos_token_ids=(EOS,), pad_token_id=PAD)
BEAM = DecodingSettings(max_new_tokens=5, num_beams=3, num_return_sequences=2, eos_token_ids=(EOS,),
                        pad_token_id=PAD)


def tokens_of(results):
    return [[c.token_ids for c in cands] for cands in results]


def test_greedy_matches_the_uncached_reference_in_input_order():
    with make(GREEDY) as g:
        results, stats = g.generate(PROMPTS)
    assert len(results) == len(PROMPTS)
    for p, cands in zip(PROMPTS, results):
        want, lp = reference_greedy(p, GREEDY.max_new_tokens)
        assert len(cands) == 1
        assert list(cands[0].token_ids) == want
        assert cands[0].sum_logprob == pytest.approx(lp, abs=1e-4)
        assert cands[0].finish_reason == ("eos" if want[-1] == EOS else "length")
    # the toy model is not degenerate: prompts get different continuations, some end on EOS
    assert len({c[0].token_ids for c in results}) > 3
    assert {c[0].finish_reason for c in results} == {"eos", "length"}
    assert stats.selects > 0  # finished rows were dropped from the cache


def test_backend_is_built_per_stream_with_its_share_of_threads():
    seen = []
    with make(GREEDY, threads=4, streams=2, rows=5, models=seen) as g:
        assert g.max_len == MAX_PROMPT + GREEDY.max_new_tokens
    assert [(m.max_rows, m.max_len, m.threads) for m in seen] == [(5, MAX_PROMPT + 6, 2)] * 2
    with pytest.raises(AssertionError, match="streams"):
        make(GREEDY, threads=1, streams=2)


@pytest.mark.parametrize("settings", [GREEDY, SAMPLE, BEAM], ids=["greedy", "sample", "beam"])
def test_two_streams_give_the_results_of_one(settings):
    with make(settings, cache_tokens=60) as g1:
        one, st1 = g1.generate(PROMPTS)
    models = []
    with make(settings, cache_tokens=60, threads=2, streams=2, models=models) as g2:
        two, st2 = g2.generate(PROMPTS)
    assert st1.batches >= 2
    assert one == two
    assert (st1.prompts, st1.batches, st1.generated_tokens) == (st2.prompts, st2.batches, st2.generated_tokens)
    assert sum(m.calls["prefill"] for m in models) == st2.batches


@pytest.mark.parametrize("settings", [GREEDY, SAMPLE, BEAM], ids=["greedy", "sample", "beam"])
def test_a_tighter_cache_budget_gives_the_same_results(settings):
    with make(settings) as big:
        want, st_big = big.generate(PROMPTS)
    assert st_big.batches == 1
    rpp = settings.rows_per_prompt
    small_tokens = (MAX_PROMPT + settings.max_new_tokens) * rpp  # one longest prompt per batch at most
    with make(settings, cache_tokens=small_tokens) as small:
        got, st_small = small.generate(PROMPTS)
    assert st_small.batches >= 4
    assert got == want
    with make(settings, window=3) as windowed:
        got_w, st_w = windowed.generate(PROMPTS)
    assert got_w == want and st_w.batches == 3


def test_sample_row_keys_make_results_independent_of_position():
    keys = [f"id{i}" for i in range(len(PROMPTS))]
    with make(SAMPLE, cache_tokens=60) as g:
        base, _ = g.generate(PROMPTS, row_keys=keys)
        order = [5, 2, 7, 0, 3, 1, 6, 4]
        shuffled, _ = g.generate([PROMPTS[i] for i in order], row_keys=[keys[i] for i in order])
        default_keys, _ = g.generate(PROMPTS)
    assert shuffled == [base[i] for i in order]
    assert tokens_of(default_keys) != tokens_of(base)  # the keys do feed the samples
    with pytest.raises(AssertionError, match="row keys"):
        make(SAMPLE).generate(PROMPTS, row_keys=keys[:-1])


def test_on_batch_once_per_batch_summing_to_the_totals():
    calls = []
    with make(SAMPLE, cache_tokens=60) as g:
        results, stats = g.generate(PROMPTS, on_batch=lambda n, tokens: calls.append((n, tokens)))
    assert len(calls) == stats.batches > 1
    assert sum(n for n, _ in calls) == len(PROMPTS) == stats.prompts
    total = sum(c.num_tokens for cands in results for c in cands)
    assert sum(t for _, t in calls) == stats.generated_tokens == total
    assert all(n >= 1 and t >= n for n, t in calls)


def test_stats():
    models = []
    with make(GREEDY, cache_tokens=60, models=models) as g:
        results, stats = g.generate(PROMPTS)
    assert stats.prompts == len(PROMPTS)
    assert stats.batches == models[0].calls["prefill"] > 1
    assert stats.step_calls == models[0].calls["step"] > 0
    assert stats.generated_tokens == sum(len(c[0].token_ids) for c in results)
    assert stats.prompt_tokens == sum(map(len, PROMPTS))
    assert stats.padded_prompt_tokens >= stats.prompt_tokens
    assert stats.prefill_seconds > 0 and stats.step_seconds > 0
    assert stats.seconds >= stats.prefill_seconds + stats.step_seconds


def test_stats_accumulate_per_call_not_across_calls():
    with make(GREEDY) as g:
        _, a = g.generate(PROMPTS[:3])
        _, b = g.generate(PROMPTS[:3])
    assert (a.prompts, a.batches, a.generated_tokens) == (b.prompts, b.batches, b.generated_tokens) == (
        3, 1, a.generated_tokens)


def test_no_prompts():
    with make(GREEDY, threads=2, streams=2) as g:
        results, stats = g.generate([])
    assert results == [] and stats.batches == 0 and stats.prompts == 0


@pytest.mark.parametrize("bad", [[1] * (MAX_PROMPT + 1), []])
def test_a_prompt_outside_the_limit_asserts(bad):
    models = []
    with make(GREEDY, models=models) as g:
        with pytest.raises(AssertionError, match="prompt 1 has"):
            g.generate([[3], bad, [4]])
    assert models[0].calls["prefill"] == 0  # refused before any model call


@pytest.mark.parametrize("streams", [1, 2])
def test_cancelled_token_raises_before_any_batch(streams):
    token = CancelToken()
    token.cancel()
    models = []
    with make(GREEDY, threads=streams, streams=streams, models=models) as g:
        with pytest.raises(Cancelled):
            g.generate(PROMPTS, cancel=token)
    assert sum(m.calls["prefill"] for m in models) == 0


def test_cancel_between_batches_stops_the_rest():
    token = CancelToken()
    models, seen = [], []

    def on_batch(n, tokens):
        seen.append(n)
        token.cancel()

    with make(GREEDY, cache_tokens=60, models=models) as g:
        with pytest.raises(Cancelled):
            g.generate(PROMPTS, cancel=token, on_batch=on_batch)
    assert len(seen) == 1 and models[0].calls["prefill"] == 1


def test_stop_strings_use_the_decode_callback():
    s = DecodingSettings(max_new_tokens=6, eos_token_ids=(EOS,), pad_token_id=PAD, stop_strings=("|",))
    want = [reference_greedy(p, 6)[0] for p in PROMPTS]
    stop_tok = next(t for w in want for t in w if t != EOS)  # a token some prompt generates

    def decode(ids):
        return "".join("|" if t == stop_tok else chr(97 + t) for t in ids)

    with make(s) as g:
        results, _ = g.generate(PROMPTS, decode=decode)
    hit = 0
    for w, cands in zip(want, results):
        c = cands[0]
        if stop_tok in w:
            cut = w[:w.index(stop_tok) + 1]
            if EOS not in cut[:-1]:
                assert list(c.token_ids) == cut and c.finish_reason == "stop" and c.stop_string == "|"
                hit += 1
                continue
        assert list(c.token_ids) == w
    assert hit >= 1


# ----------------------------------------------------------------------------- continuous batching

MANY_PROMPTS = [list(np.random.default_rng(i).integers(2, VOCAB, 1 + i % MAX_PROMPT)) for i in range(29)]


@pytest.mark.parametrize("settings", [GREEDY, SAMPLE, BEAM], ids=["greedy", "sample", "beam"])
@pytest.mark.parametrize("shape", [dict(), dict(cache_tokens=60), dict(window=7, cache_tokens=80),
                                   dict(threads=2, streams=2, cache_tokens=60), dict(cache_tokens=60, admit_min=3)],
                         ids=["one-run", "tight", "windows", "streams", "admit-3"])
def test_continuous_batching_gives_the_static_results(settings, shape):
    prompts = [[int(t) for t in p] for p in MANY_PROMPTS]
    keys = [f"id{i}" for i in range(len(prompts))]
    with make(settings, cache_tokens=shape.get("cache_tokens", 10_000), window=shape.get("window")) as g:
        want, st_static = g.generate(prompts, row_keys=keys)
    models, calls = [], []
    with make(settings, batching="continuous", models=models, **shape) as g:
        got, st = g.generate(prompts, row_keys=keys, on_batch=lambda n, t: calls.append((n, t)),
                             on_candidates=lambda rows, out: calls.append(("rows", sorted(rows.tolist()))))
    assert got == want  # the toy's logits are row by row: bitwise
    assert (st.prompts, st.generated_tokens, st.prompt_tokens) == (
        st_static.prompts, st_static.generated_tokens, st_static.prompt_tokens)
    # on_candidates names every prompt once; on_batch's counts add up to the totals
    named = [r for c in calls if c[0] == "rows" for r in c[1]]
    assert sorted(named) == list(range(len(prompts)))
    assert sum(n for n, t in calls if n != "rows") == len(prompts)
    assert sum(t for n, t in calls if n != "rows") == st.generated_tokens
    if "cache_tokens" in shape:
        assert st.inserts >= 1 and sum(m.calls.get("insert", 0) for m in models) == st.inserts
        if settings is not SAMPLE and shape.get("admit_min", 1) == 1:
            assert st.idle_row_steps <= st_static.idle_row_steps
            assert st.idle_row_steps_waiting == 0  # no step ran a finished row while prompts waited
        if settings is not BEAM:  # independent rows: the same tokens take the same useful row-steps
            assert st.row_steps - st.idle_row_steps == st_static.row_steps - st_static.idle_row_steps


def test_continuous_batching_keeps_the_cache_budget():
    """Rows x columns never exceed what the budget allows the window's first (longest) batch."""
    prompts = [[int(t) for t in p] for p in MANY_PROMPTS]
    peak = []

    class Peak(SumLM):
        def step(self, ids, pos, mask):
            peak.append(mask.shape[0] * mask.shape[1])
            return super().step(ids, pos, mask)

    budget = 60
    s = GeneratorSettings(BEAM, budget * BYTES_PER_TOKEN, 64, MAX_PROMPT, batching="continuous")
    with Generator(MODEL, s, backend=lambda r, n, t: Peak(r, n, t)) as g:
        _, st = g.generate(prompts)
    assert st.compactions >= 1 and max(peak) <= budget


def test_continuous_batching_refuses_a_model_without_insert():
    class Static(SumLM):
        insert = compact = None

    s = GeneratorSettings(GREEDY, 10_000 * BYTES_PER_TOKEN, 64, MAX_PROMPT, batching="continuous")
    with Generator(MODEL, s, backend=lambda r, n, t: Static(r, n, t)) as g:
        with pytest.raises(AssertionError, match="batching='static'"):
            g.generate(PROMPTS)


@pytest.mark.parametrize("streams", [1, 2])
def test_continuous_cancelled_token_raises_before_any_prefill(streams):
    token = CancelToken()
    token.cancel()
    models = []
    with make(GREEDY, threads=streams, streams=streams, models=models, batching="continuous") as g:
        with pytest.raises(Cancelled):
            g.generate(PROMPTS, cancel=token)
    assert sum(m.calls["prefill"] for m in models) == 0


def test_continuous_cancel_stops_before_the_next_admission():
    token = CancelToken()
    models = []
    prompts = [[int(t) for t in p] for p in MANY_PROMPTS]
    with make(GREEDY, cache_tokens=60, models=models, batching="continuous") as g:
        with pytest.raises(Cancelled):
            g.generate(prompts, cancel=token, on_candidates=lambda rows, out: token.cancel())
    assert models[0].calls.get("insert", 0) < len(prompts) - 1
