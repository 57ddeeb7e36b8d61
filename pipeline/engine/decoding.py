"""Decoding for batch generation: greedy, beam search and sampling over a step function (no paddle).

The model sits behind `StepModel`, three calls on numpy arrays, so that a Paddle Inference
predictor, the dynamic-graph `DecoderForCausalLM` or a numpy toy model in the tests can serve:

- `prefill(input_ids, position_ids, attention_mask)` with a left-padded batch [B, L] (int64)
  returns the logits after each row's last prompt token [B, V] and starts the model's
  key/value cache for those B rows;
- `step(input_ids [R, 1], position_ids [R, 1], attention_mask [R, T])` feeds one new token per
  row; the mask covers the T - 1 cached columns and the new one; returns logits [R, V];
- `select(rows)`: the cache keeps row `rows[i]` as its new row i. Rows may repeat (beams that
  share a parent, samples of one prompt) and may be left out (finished rows, done prompts).

This module runs static batches: a batch runs until its longest row ends. Finished rows stop
costing compute by being dropped: `select` keeps only the rows that continue. The gather copies
every layer's live columns (SmolLM2, batch 32, 150 columns: about 220 MB), so it is done lazily
(`_Batch`): finished rows stay in place, fed padding and ignored, until a quarter of the batch has
finished, and then one gather drops them all. `DecodingSettings.drop_finished=False` never drops
a row (finished rows fed padding to the end), to measure the difference and to test that
dropping changes no result. Refilling a finished row's slot with the next prompt instead
(continuous batching, which needs a model that can prefill into a running batch: `insert`,
`compact`) is `engine/continuous.py`; it shares this module's per-step arithmetic
(`_beam_step` for beams; the same logits functions for rows), so both give the same results.

Strategies, as Hugging Face's `generate` defines them:
- greedy: argmax of the logits;
- beam search (`num_beams`, `num_return_sequences`, `length_penalty`, `early_stopping` True,
  False or "never", EOS): HF's `BeamSearchScorer`: each step ranks the max(2, 1 + #eos) x
  num_beams best continuations of a prompt's beams by summed log-probability; an EOS among the
  first num_beams goes into the prompt's n-best list (scored sum / generated_length **
  length_penalty, the EOS counted in both), the first num_beams others are the next beams; a
  prompt is done by HF's `is_done` rule for its `early_stopping`; at max_new_tokens the
  remaining beams join the n-best list. One difference: HF starts a prompt with num_beams
  copies of its prompt, all but one at -1e9, and may carry such placeholder beams while the
  vocabulary offers fewer real continuations than beams; here a prompt starts with one beam and
  has at most num_beams real ones. The results are the same whenever the vocabulary has at
  least num_beams non-EOS tokens.
- sampling (`temperature`, `top_k`, `top_p`, HF's order and rules, `num_return_sequences`
  samples per prompt): each sample row draws one uniform per step from its own numpy Generator
  seeded from a hash of (seed, row key, sample index), and picks by inverse CDF; nothing of it
  depends on the batch the row lands in, nor on which other rows have finished.

Every candidate reports its tokens (EOS included, as HF's sequences hold it), the sum and mean
of their log-probabilities under the model (log-softmax of its raw logits, before temperature
or filtering; float64 sums, the softmax normaliser from one exp pass in the logits' precision)
and why it ended: 'eos', 'length' (max_new_tokens) or 'stop' (a stop string
appeared in the detokenized text; `decode` is the caller's detokenizer, called on a row's
generated tokens). A stop string acts as an EOS would: in beam search a continuation that
completes one ends its hypothesis. Candidates are ranked by `score`: the beam score for beam
search, the mean log-probability otherwise.

Per step, the numpy work on the [R, V] logits is one exp pass (the log-softmax normalisers of
the rows), an argmax (greedy), a few argmax passes for the num_beams x 2 best tokens of each
beam (beam search), a partition for top-k and a partial sort for top-p (sampling): no sort of
the vocabulary and no [R, V] float64 copy. Every operation is row by row, so a row's result
does not depend on the rows beside it (given a model whose logits do not either).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Protocol

import numpy as np

from pipeline.engine.generation_batching import (
    GenerationBudget,
    PaddedPrompts,
    left_pad,
    plan_generation_batches,
    restore_order,
)
from pipeline.engine.logits import (  # noqa: F401 - filter_logits, log_softmax: re-exported for callers
    RowKey,
    as_float,
    filter_logits,
    log_normalizers,
    log_softmax,
    row_generator,
    sample_tokens,
    sampling_keep,
    token_logprobs,
    top_tokens,
)
from pipeline.errors import ConfigError

from pipeline.engine.decoding_settings import EOS, LENGTH, STOP, Candidate, DecodeStats, DecodingSettings  # noqa: F401


class StepModel(Protocol):
    """A model with its key/value cache (stateful: one per stream); `prefill` starts a batch."""

    def prefill(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...

    def select(self, rows: np.ndarray) -> None: ...


def _stop_hit(decode: Callable[[Sequence[int]], str], stops: tuple[str, ...], tokens: Sequence[int]) -> Optional[str]:
    """The stop string that occurs earliest in decode(tokens), or None."""
    text = decode(tokens)
    best: Optional[tuple[int, str]] = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return None if best is None else best[1]


class _Batch:
    """The model's rows as its cache holds them: the mask and next positions of each, which cache
    row each logical row (the caller's numbering) lives in, and the calls that move them.

    Compaction is lazy: gathering the cache (`select`) copies every layer's live columns, so a
    few finished rows are kept in place, fed padding and their outputs ignored, until at least
    COMPACT_FRACTION of the cache rows are finished; then one `select` drops them all. Repeated
    parents (beams, samples of one prompt) always need a `select`. Without drop_finished, rows
    are only ever gathered for repeats, and finished ones stay in place to the end."""

    COMPACT_FRACTION = 0.25

    def __init__(self, model: StepModel, prompts: PaddedPrompts, s: DecodingSettings, stats: DecodeStats):
        self.model, self.s, self.stats = model, s, stats
        self.mask = prompts.attention_mask.astype(np.int64)
        self.next_pos = prompts.position_ids[:, -1].astype(np.int64) + 1
        self.phys = np.arange(len(self.mask))  # logical row i -> its cache row

    def prefill(self, prompts: PaddedPrompts) -> np.ndarray:
        logits = np.asarray(self.model.prefill(prompts.input_ids, prompts.position_ids, self.mask))
        assert logits.ndim == 2 and logits.shape[0] == len(self.mask), f"prefill returned {logits.shape}"
        return logits

    def advance(self, parents: np.ndarray, tokens: np.ndarray, width: int) -> np.ndarray:
        """Continue logical rows `parents` (repeats allowed) with one token each; their logits,
        in the order of `parents`, which become logical rows 0..len(parents)-1. Without
        drop_finished a gather keeps the batch at `width` rows (filler rows fed padding)."""
        n = len(parents)
        phys = self.phys[np.asarray(parents, dtype=np.int64)]
        tokens = np.asarray(tokens, dtype=np.int64)
        rows = len(self.mask)
        repeats = len(np.unique(phys)) != n
        dead = rows - n
        if repeats or (self.s.drop_finished and dead and dead >= self.COMPACT_FRACTION * rows):
            keep = phys
            if not self.s.drop_finished and n < width:
                keep = np.concatenate([phys, np.full(width - n, phys[0], np.int64)])
            self.model.select(keep)
            self.mask, self.next_pos = self.mask[keep], self.next_pos[keep]
            self.stats.selects += 1
            phys = np.arange(n)
            feed = np.full(len(keep), self.s.pad_token_id, np.int64)
            feed[:n] = tokens
        else:  # rows stay where they are; finished ones are fed padding
            feed = np.full(rows, self.s.pad_token_id, np.int64)
            feed[phys] = tokens
        self.mask = np.concatenate([self.mask, np.ones((len(self.mask), 1), np.int64)], axis=1)
        logits = np.asarray(self.model.step(feed[:, None], self.next_pos[:, None].copy(), self.mask))
        assert logits.ndim == 2 and logits.shape[0] == len(self.mask), f"step returned {logits.shape}"
        self.next_pos = self.next_pos + 1
        self.phys = phys
        self.stats.step_calls += 1
        self.stats.row_steps += len(self.mask)
        self.stats.idle_row_steps += len(self.mask) - n
        return logits[phys]


# ----------------------------------------------------------------------------- greedy and sampling


def _decode_rows(batch: _Batch, first: np.ndarray, s: DecodingSettings, keys: Sequence[RowKey],
                 decode: Optional[Callable]) -> list[list[Candidate]]:
    """Greedy or sampling: every row on its own; `num_return_sequences` sample rows per prompt."""
    b = len(first)
    sampling = s.resolved_strategy == "sample"
    n = s.num_return_sequences if sampling else 1
    prompt_of = np.repeat(np.arange(b), n)
    rngs = [row_generator(s.seed, keys[p], j) for p, j in zip(prompt_of, np.tile(np.arange(n), b))] if sampling else []
    eos = set(s.eos_token_ids)
    tokens: list[list[int]] = [[] for _ in range(b * n)]
    sums = [0.0] * (b * n)
    done: list[Optional[Candidate]] = [None] * (b * n)
    live = np.arange(b * n)  # logical rows still generating
    cache_row = prompt_of.copy()  # each live row's row in the model's cache
    logits = first[cache_row]
    for t in range(s.max_new_tokens):
        x = as_float(logits)
        if sampling:
            u = np.array([rngs[i].random() for i in live])
            y = x / s.temperature
            tok = sample_tokens(y, sampling_keep(y, s.top_k, s.top_p), u)
        else:
            tok = x.argmax(axis=-1)
        tok_lp = token_logprobs(x, *log_normalizers(x), np.arange(len(live)), tok)
        cont = np.ones(len(live), dtype=bool)
        for i, row in enumerate(live):
            tk = int(tok[i])
            tokens[row].append(tk)
            sums[row] += float(tok_lp[i])
            reason, stop = None, None
            if tk in eos:
                reason = EOS
            elif s.stop_strings and (stop := _stop_hit(decode, s.stop_strings, tokens[row])) is not None:
                reason = STOP
            elif t == s.max_new_tokens - 1:
                reason = LENGTH
            if reason is not None:
                done[row] = Candidate(tuple(tokens[row]), sums[row], sums[row] / len(tokens[row]), reason, stop)
                cont[i] = False
        if not cont.any():
            break
        live = live[cont]
        logits = batch.advance(cache_row[cont], tok[cont], width=b * n)
        cache_row = np.arange(len(live))
    out = []
    for p in range(b):
        cands = done[p * n:(p + 1) * n]
        out.append(sorted(cands, key=lambda c: -c.score))  # stable: equal scores keep sample order
    return out


# ----------------------------------------------------------------------------- beam search


class _NBest:
    """One prompt's finished hypotheses: HF's `BeamHypotheses` (keep the num_beams best)."""

    def __init__(self, s: DecodingSettings):
        self.k, self.lp, self.early, self.max_len = s.num_beams, s.length_penalty, s.early_stopping, s.max_new_tokens
        self.items: list[Candidate] = []
        self.worst = 1e9

    def add(self, c: Candidate) -> None:
        if len(self.items) < self.k or c.score > self.worst:
            self.items.append(c)
            if len(self.items) > self.k:
                ranked = sorted(range(len(self.items)), key=lambda i: (self.items[i].score, i))
                self.worst = self.items[ranked[1]].score
                del self.items[ranked[0]]
            else:
                self.worst = min(c.score, self.worst)

    def is_done(self, best_sum: float, generated: int) -> bool:
        if len(self.items) < self.k:
            return False
        if self.early is True:
            return True
        length = self.max_len if (self.early == "never" and self.lp > 0) else generated
        return self.worst >= best_sum / length ** self.lp

    def ranked(self, n: int) -> list[Candidate]:
        return sorted(self.items, key=lambda c: -c.score)[:n]


def _beam_step(logits: np.ndarray, beam_prompt: np.ndarray, beam_tokens: list[list[int]], beam_sums: np.ndarray,
               hyps: dict, s: DecodingSettings, decode: Optional[Callable]) -> tuple[list, list, list, list, list]:
    """One beam-search step for live beams grouped by prompt (each prompt's beams contiguous,
    all of one prompt with the same number of tokens): each prompt's next beams, as (parents:
    indices into the given beams, tokens, sums, prompts, token lists). A prompt that is done, or
    reaches max_new_tokens, puts its hypotheses into `hyps[prompt]` and has no next beams.
    Shared by static batches (every prompt at the same step) and continuous batching (prompts
    that joined at different steps)."""
    v = logits.shape[1]
    k = s.num_beams
    eos = set(s.eos_token_ids)
    n_cand = max(2, 1 + len(eos)) * k  # continuations ranked per prompt, as HF
    # A prompt's best n_cand continuations are among each of its beams' best n_cand tokens,
    # so only those are scored: no [beams, V] log-softmax, no sort over the vocabulary.
    x = as_float(logits)
    top = top_tokens(x, n_cand)
    rows = np.repeat(np.arange(len(x)), top.shape[1])
    scores = beam_sums[rows] + token_logprobs(x, *log_normalizers(x), rows, top.ravel())
    scores = scores.reshape(top.shape)
    parents: list[int] = []
    new_tok: list[int] = []
    new_sum: list[float] = []
    new_prompt: list[int] = []
    new_tokens: list[list[int]] = []
    bounds = np.flatnonzero(np.diff(beam_prompt)) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(beam_prompt)]])):
        p = int(beam_prompt[lo])
        generated = len(beam_tokens[lo]) + 1
        last = generated == s.max_new_tokens
        cand = scores[lo:hi].ravel()
        flat = ((np.arange(hi - lo) * v)[:, None] + top[lo:hi]).ravel()  # beam-major, as HF flattens
        order = np.lexsort((flat, -cand))[:n_cand]  # best first, ties by index
        start = len(parents)
        for rank, j in enumerate(order):
            beam, tk, sc = lo + int(flat[j]) // v, int(flat[j]) % v, float(cand[j])
            seq = beam_tokens[beam] + [tk]
            reason, stop = (EOS, None) if tk in eos else (None, None)
            if reason is None and s.stop_strings:
                stop = _stop_hit(decode, s.stop_strings, seq)
                reason = STOP if stop is not None else None
            if reason is not None:
                if rank < k:  # HF: an ending outside the top num_beams is not kept
                    hyps[p].add(Candidate(tuple(seq), sc, sc / generated ** s.length_penalty, reason, stop))
                continue
            parents.append(beam)
            new_tok.append(tk)
            new_sum.append(sc)
            new_prompt.append(p)
            new_tokens.append(seq)
            if len(parents) - start == k:
                break
        done = len(parents) == start or hyps[p].is_done(float(cand[order[0]]), generated)
        if not done and last:
            for seq, sc in zip(new_tokens[start:], new_sum[start:]):
                hyps[p].add(Candidate(tuple(seq), sc, sc / generated ** s.length_penalty, LENGTH))
        if done or last:
            del parents[start:], new_tok[start:], new_sum[start:], new_prompt[start:], new_tokens[start:]
    return parents, new_tok, new_sum, new_prompt, new_tokens


def _decode_beams(batch: _Batch, first: np.ndarray, s: DecodingSettings,
                  decode: Optional[Callable]) -> list[list[Candidate]]:
    b = len(first)
    hyps = {p: _NBest(s) for p in range(b)}
    # The live beams, grouped by prompt in prompt order.
    beam_prompt = np.arange(b)
    beam_tokens: list[list[int]] = [[] for _ in range(b)]
    beam_sums = np.zeros(b)
    logits = first
    for _ in range(s.max_new_tokens):
        parents, new_tok, new_sum, new_prompt, new_tokens = _beam_step(logits, beam_prompt, beam_tokens, beam_sums,
                                                                       hyps, s, decode)
        if not parents:
            break
        logits = batch.advance(np.array(parents), np.array(new_tok), width=b * s.num_beams)
        beam_prompt, beam_tokens, beam_sums = np.array(new_prompt), new_tokens, np.array(new_sum)
    return [hyps[p].ranked(s.num_return_sequences) for p in range(b)]


# ----------------------------------------------------------------------------- entry points


def decode_batch(model: StepModel, prompts: PaddedPrompts, s: DecodingSettings,
                 row_keys: Optional[Sequence[RowKey]] = None, decode: Optional[Callable[[Sequence[int]], str]] = None,
                 stats: Optional[DecodeStats] = None) -> list[list[Candidate]]:
    """One pre-padded batch: prefill, then decode; per row, its ranked candidates (at most
    num_return_sequences). `row_keys` name the rows for sampling (default: 0..B-1, which makes a
    sample depend on the row's place in this batch; `generate` passes input indices)."""
    if s.stop_strings and decode is None:
        raise ConfigError("stop strings need a decode callback (token ids -> text)")
    stats = stats if stats is not None else DecodeStats()
    b = len(prompts.input_ids)
    keys = list(range(b)) if row_keys is None else list(row_keys)
    assert len(keys) == b, f"{len(keys)} row keys for {b} rows"
    batch = _Batch(model, prompts, s, stats)
    first = batch.prefill(prompts)
    stats.prompts += b
    stats.batches += 1
    stats.prompt_tokens += int(prompts.attention_mask.sum())
    stats.padded_prompt_tokens += int(prompts.attention_mask.size)
    if s.resolved_strategy == "beam":
        out = _decode_beams(batch, first, s, decode)
    else:
        out = _decode_rows(batch, first, s, keys, decode)
    stats.generated_tokens += sum(c.num_tokens for cands in out for c in cands)
    return out


def generate(model: StepModel, prompts: Sequence[Sequence[int]], s: DecodingSettings, budget: GenerationBudget,
             row_keys: Optional[Sequence[RowKey]] = None, decode: Optional[Callable[[Sequence[int]], str]] = None,
             on_batch: Optional[Callable[[int], None]] = None) -> tuple[list[list[Candidate]], DecodeStats]:
    """Prompts (token ids) -> ranked candidates per prompt, in input order, and what it took.

    Plans pre-padded batches on `budget` (refusing a prompt that cannot fit before any model
    call), decodes each, restores input order. Sample rows are keyed by `row_keys` (default: the
    prompt's index here; pass stable ids, such as the input's line, to keep samples across runs
    that split the input differently)."""
    batches = plan_generation_batches([len(p) for p in prompts], s.max_new_tokens, s.rows_per_prompt, budget)
    keys = list(range(len(prompts))) if row_keys is None else list(row_keys)
    assert len(keys) == len(prompts), f"{len(keys)} row keys for {len(prompts)} prompts"
    stats, results = DecodeStats(), []
    for batch in batches:
        padded = left_pad(prompts, batch.rows, batch.prompt_len, s.pad_token_id)
        results.append(decode_batch(model, padded, s, [keys[int(i)] for i in batch.rows], decode, stats))
        if on_batch is not None:
            on_batch(len(batch.rows))
    return restore_order(batches, results, len(prompts)), stats
