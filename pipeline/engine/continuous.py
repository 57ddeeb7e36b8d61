"""Continuous batching: a window's prompts feed a fixed number of slots; when a sequence (greedy or
sampling row) or a prompt's whole beam group finishes, the next waiting prompt is prefilled into
the freed cache rows, so the batch does not keep running with finished rows (no paddle).

    decode_continuous(model, prompts, order, s, plan, row_keys, decode, stats, on_done) -> {prompt: candidates}

How a newcomer joins a pre-padded batch. Every row generates at one shared current column c
(the cache's `length`). A newcomer of L <= c tokens has its keys and values written right-aligned
at columns [c - L, c) of its row (`ContinuousStepModel.insert`), with the mask off on the row's
other columns; its position ids count its own real tokens (0..L-1, then L, L+1, ...), so, as for
any pre-padded row, its outputs do not depend on where it sits or on who sat there before.

L > c does not happen: prompts wait longest first (sorted within the window), the first fill
starts c at the window's longest prompt, c only grows by steps, and compaction (below) never
takes c below the longest prompt still waiting. (The alternative, shifting every row right to
make room, would be a copy of the whole cache per such newcomer.)

Columns run out because c grows by one per step while the batch lives on. The cache is sized for
`columns` = the window's longest prompt + max_new_tokens, the same as the first static batch of
the window and as the key/value budget was checked for, and never holds more: when a step would
need column `columns`, the leading columns no live row uses any more (every row's real tokens
start at or after min(first real column)) are dropped (`compact`: one copy of the live cache).
That is always enough: a live row that started at column a with L tokens has made fewer than
max_new_tokens steps, so it needs at most L + max_new_tokens - 1 columns from its first one.

Newcomers are prefilled in groups: `plan.admit_min` free prompt slots (or the whole rest of the
queue) before a prefill call, and the call itself is split by the model into groups of similar
length (a prefill call has a fixed cost). With admit_min = 1, a slot is refilled at the step its
sequence finishes, so no step runs a finished row while prompts wait; with more, a freed row is
fed padding until enough others are free. When nothing waits any more, finished rows leave the
batch lazily, as in static batches (`decoding._Batch`).

Sampling rows and beams of a newcomer start as one cache row (its prefill) and are copied to
their rows by the next gather (`select`), exactly as a static batch's first step does. Beam
search gathers its beams every step anyway, so its freed rows are simply not gathered again.

Results are those of static batching: each prompt's tokens and candidates come from its own rows
only (the per-row arithmetic is the same functions, on the same values); only the model's
floating-point results may differ in the last digits where a kernel blocks a different batch
shape differently.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

from pipeline.engine.decoding import (
    EOS,
    LENGTH,
    STOP,
    Candidate,
    DecodeStats,
    DecodingSettings,
    StepModel,
    _beam_step,
    _NBest,
    _stop_hit,
)
from pipeline.engine.generation_batching import left_pad
from pipeline.engine.logits import (
    RowKey,
    as_float,
    log_normalizers,
    row_generator,
    sample_tokens,
    sampling_keep,
    token_logprobs,
)
from pipeline.errors import ConfigError


class ContinuousStepModel(StepModel, Protocol):
    """A StepModel that can also take prompts into a running batch and drop leading columns."""

    def insert(self, rows: np.ndarray, input_ids: np.ndarray, position_ids: np.ndarray,
               attention_mask: np.ndarray) -> np.ndarray: ...

    def compact(self, first: int) -> None: ...


def supports_continuous(model) -> bool:
    return callable(getattr(model, "insert", None)) and callable(getattr(model, "compact", None))


@dataclass(frozen=True)
class SlotPlan:
    """How one continuous run is shaped (the generator derives it from the cache budget)."""

    slots: int  # prompts decoded at once
    columns: int  # cache columns the run may use: the window's longest prompt + max_new_tokens
    max_rows: int  # the model's row capacity (>= slots x rows per prompt)
    admit_min: int = 1  # free prompt slots to wait for before a prefill call admits newcomers

    def __post_init__(self) -> None:
        assert self.slots >= 1 and self.columns >= 2 and self.admit_min >= 1, self
        assert self.max_rows >= self.slots, self


class _Rows:
    """The model's cache rows in a continuous run: each row's mask and next position, and the
    calls that change them (start, insert, step with gather and compaction)."""

    DROP_FRACTION = 0.25  # as decoding._Batch: finished rows leave once a quarter is finished

    def __init__(self, model: ContinuousStepModel, s: DecodingSettings, plan: SlotPlan, stats: DecodeStats):
        self.model, self.s, self.plan, self.stats = model, s, plan, stats
        self.mask = np.zeros((0, 0), np.int64)
        self.next_pos = np.zeros(0, np.int64)

    @property
    def rows(self) -> int:
        return len(self.mask)

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def start(self, prompts: Sequence[Sequence[int]], which: list[int]) -> np.ndarray:
        padded = left_pad(prompts, np.asarray(which), max(len(prompts[i]) for i in which), self.s.pad_token_id)
        self.mask = padded.attention_mask.astype(np.int64)
        self.next_pos = padded.position_ids[:, -1].astype(np.int64) + 1
        logits = np.asarray(self.model.prefill(padded.input_ids, padded.position_ids, self.mask))
        self._count(padded)
        assert logits.ndim == 2 and logits.shape[0] == len(which), f"prefill returned {logits.shape}"
        return logits

    def _count(self, padded) -> None:
        self.stats.prompts += len(padded.input_ids)
        self.stats.prompt_tokens += int(padded.attention_mask.sum())
        self.stats.padded_prompt_tokens += int(padded.attention_mask.size)

    def free_rows(self, used: set[int], n: int) -> np.ndarray:
        """n cache rows for newcomers: rows no live sequence uses, then new rows past the batch."""
        free = [r for r in range(self.rows) if r not in used][:n]
        free += list(range(self.rows, self.rows + n - len(free)))
        assert not free or free[-1] < self.plan.max_rows, (
            f"newcomers need row {free[-1]}, the model holds {self.plan.max_rows}")
        return np.asarray(free, np.int64)

    def insert(self, prompts: Sequence[Sequence[int]], which: list[int], rows: np.ndarray) -> np.ndarray:
        longest = max(len(prompts[i]) for i in which)
        c = self.length
        assert longest <= c, f"a newcomer of {longest} tokens cannot end at column {c} (see the module doc)"
        padded = left_pad(prompts, np.asarray(which), longest, self.s.pad_token_id)
        grow = int(max(rows.max() + 1 - self.rows, 0))
        if grow:
            self.mask = np.concatenate([self.mask, np.zeros((grow, c), np.int64)])
            self.next_pos = np.concatenate([self.next_pos, np.zeros(grow, np.int64)])
        self.mask[rows] = 0
        self.mask[rows, c - longest:] = padded.attention_mask
        self.next_pos[rows] = padded.position_ids[:, -1] + 1
        logits = np.asarray(self.model.insert(rows, padded.input_ids, padded.position_ids,
                                              padded.attention_mask.astype(np.int64)))
        assert logits.ndim == 2 and logits.shape[0] == len(which), f"insert returned {logits.shape}"
        self._count(padded)
        self.stats.inserts += 1
        self.stats.inserted_prompts += len(which)
        return logits

    def step(self, parents: np.ndarray, tokens: np.ndarray, waiting_longest: int) -> tuple[np.ndarray, np.ndarray]:
        """Continue cache rows `parents` (repeats allowed) with one token each; returns their
        logits in that order and the cache row each now lives in. `waiting_longest`: the longest
        prompt still waiting (0: none), which compaction must leave room for."""
        parents = np.asarray(parents, np.int64)
        tokens = np.asarray(tokens, np.int64)
        n, rows = len(parents), self.rows
        distinct = len(np.unique(parents))
        dead = rows - distinct
        drain = waiting_longest == 0 and self.s.drop_finished and dead and dead >= self.DROP_FRACTION * rows
        if distinct != n or drain:
            self.model.select(parents)
            self.mask, self.next_pos = self.mask[parents], self.next_pos[parents]
            self.stats.selects += 1
            where = np.arange(n)
            feed = tokens
        else:  # rows stay where they are; finished ones are fed padding
            where = parents
            feed = np.full(rows, self.s.pad_token_id, np.int64)
            feed[parents] = tokens
        if self.length + 1 > self.plan.columns:
            self._compact(where, waiting_longest)
        self.mask = np.concatenate([self.mask, np.ones((self.rows, 1), np.int64)], axis=1)
        logits = np.asarray(self.model.step(feed[:, None], self.next_pos[:, None].copy(), self.mask))
        assert logits.ndim == 2 and logits.shape[0] == self.rows, f"step returned {logits.shape}"
        self.next_pos = self.next_pos + 1
        self.stats.step_calls += 1
        self.stats.row_steps += self.rows
        self.stats.idle_row_steps += self.rows - n
        if waiting_longest:
            self.stats.idle_row_steps_waiting += self.rows - n
        return logits[where], where

    def _compact(self, live: np.ndarray, waiting_longest: int) -> None:
        first_real = int(self.mask[live].argmax(axis=1).min())  # every live row's real tokens start here or later
        drop = min(first_real, self.length - waiting_longest)
        need = self.length + 1 - self.plan.columns
        assert drop >= need, (f"compaction frees {drop} columns, the step needs {need} (first live column "
                              f"{first_real}, longest waiting prompt {waiting_longest})")
        self.model.compact(drop)
        self.mask = self.mask[:, drop:]
        self.stats.compactions += 1


def _admit_count(free_slots: int, waiting: int, live: int, admit_min: int) -> int:
    """How many waiting prompts to prefill now: all the free slots allow, once at least
    admit_min slots are free (or all that wait fit, or nothing else is running)."""
    n = min(free_slots, waiting)
    if n == 0:
        return 0
    return n if (n >= admit_min or n == waiting or live == 0) else 0


# ----------------------------------------------------------------------------- greedy and sampling


def _decode_rows(model: ContinuousStepModel, prompts: Sequence[Sequence[int]], order: Sequence[int],
                 s: DecodingSettings, plan: SlotPlan, keys: Sequence[RowKey], decode: Optional[Callable],
                 stats: DecodeStats, on_done: Optional[Callable[[list[int], list[list[Candidate]]], None]],
                 check: Optional[Callable[[], None]]) -> dict[int, list[Candidate]]:
    sampling = s.resolved_strategy == "sample"
    n = s.num_return_sequences if sampling else 1
    eos = set(s.eos_token_ids)
    queue = deque(int(i) for i in order)
    cache = _Rows(model, s, plan, stats)
    # Per logical row (a prompt's sample j): its prompt, tokens, log-probability sum, generator.
    prompt_of: list[int] = []
    sample_of: list[int] = []
    tokens: list[list[int]] = []
    sums: list[float] = []
    rngs: list = []
    where: dict[int, int] = {}  # live logical row -> its cache row
    done: dict[int, list[Optional[Candidate]]] = {}  # prompt -> its rows' candidates
    results: dict[int, list[Candidate]] = {}

    def add_rows(which: list[int], cache_rows: np.ndarray) -> list[int]:
        new = []
        for p, r in zip(which, cache_rows):
            done[p] = [None] * n
            for j in range(n):
                i = len(prompt_of)
                prompt_of.append(p)
                sample_of.append(j)
                tokens.append([])
                sums.append(0.0)
                rngs.append(row_generator(s.seed, keys[p], j) if sampling else None)
                where[i] = int(r)
                new.append(i)
        return new

    def choose(rows: list[int], logits: np.ndarray) -> tuple[list[int], list[int]]:
        """Pick each row's next token; the rows that go on, and the prompts that are complete."""
        x = as_float(logits)
        if sampling:
            u = np.array([rngs[i].random() for i in rows])
            y = x / s.temperature
            tok = sample_tokens(y, sampling_keep(y, s.top_k, s.top_p), u)
        else:
            tok = x.argmax(axis=-1)
        tok_lp = token_logprobs(x, *log_normalizers(x), np.arange(len(rows)), tok)
        going, complete = [], []
        for k, i in enumerate(rows):
            tk = int(tok[k])
            tokens[i].append(tk)
            sums[i] += float(tok_lp[k])
            reason, stop = None, None
            if tk in eos:
                reason = EOS
            elif s.stop_strings and (stop := _stop_hit(decode, s.stop_strings, tokens[i])) is not None:
                reason = STOP
            elif len(tokens[i]) == s.max_new_tokens:
                reason = LENGTH
            if reason is None:
                going.append(i)
                continue
            p = prompt_of[i]
            del where[i]
            done[p][sample_of[i]] = Candidate(
                tuple(tokens[i]), sums[i], sums[i] / len(tokens[i]), reason, stop)
            if all(c is not None for c in done[p]):
                complete.append(p)
        return going, complete

    def finish(complete: list[int]) -> None:
        for p in complete:
            results[p] = sorted(done.pop(p), key=lambda c: -c.score)  # stable: equal scores keep sample order
        if complete and on_done is not None:
            on_done(complete, [results[p] for p in complete])

    first = [queue.popleft() for _ in range(min(plan.slots, len(queue)))]
    pending = add_rows(first, np.arange(len(first)))
    logits = cache.start(prompts, first)[[where[i] for i in pending]]
    while True:
        live, complete = choose(pending, logits)
        while queue:
            # Slots are counted in rows: a sample row that ends frees its row even while its
            # prompt's other samples go on; a newcomer needs n free rows.
            k = _admit_count((plan.slots * n - len(live)) // n, len(queue), len(live), plan.admit_min)
            if k == 0:
                break
            if check is not None:
                check()
            which = [queue.popleft() for _ in range(k)]
            rows = cache.free_rows({where[i] for i in live}, k)
            new = add_rows(which, rows)
            new_logits = cache.insert(prompts, which, rows)[np.repeat(np.arange(k), n)]
            going, also = choose(new, new_logits)
            live += going
            complete += also
        finish(complete)
        if not live:
            assert not queue, "prompts left waiting with nothing running"
            break
        logits, at = cache.step(np.array([where[i] for i in live]), np.array([tokens[i][-1] for i in live]),
                                len(prompts[queue[0]]) if queue else 0)
        for i, r in zip(live, at):
            where[i] = int(r)
        pending = live
    return results


# ----------------------------------------------------------------------------- beam search


def _decode_beams(model: ContinuousStepModel, prompts: Sequence[Sequence[int]], order: Sequence[int],
                  s: DecodingSettings, plan: SlotPlan, decode: Optional[Callable], stats: DecodeStats,
                  on_done: Optional[Callable[[list[int], list[list[Candidate]]], None]],
                  check: Optional[Callable[[], None]]) -> dict[int, list[Candidate]]:
    queue = deque(int(i) for i in order)
    cache = _Rows(model, s, plan, stats)
    hyps: dict[int, _NBest] = {}
    results: dict[int, list[Candidate]] = {}
    # The live beams (grouped by prompt), each with the cache row it reads.
    beam_prompt = np.zeros(0, np.int64)
    beam_tokens: list[list[int]] = []
    beam_sums = np.zeros(0)
    beam_row = np.zeros(0, np.int64)

    first = [queue.popleft() for _ in range(min(plan.slots, len(queue)))]
    for p in first:
        hyps[p] = _NBest(s)
    logits = cache.start(prompts, first)
    beam_prompt, beam_tokens, beam_sums, beam_row = (np.asarray(first, np.int64), [[] for _ in first],
                                                     np.zeros(len(first)), np.arange(len(first)))
    while True:
        par, tok, sums, prm, seqs = _beam_step(logits, beam_prompt, beam_tokens, beam_sums, hyps, s, decode)
        parents = [int(beam_row[j]) for j in par]
        before = set(int(p) for p in beam_prompt)
        active = set(prm)
        while queue:
            k = _admit_count(plan.slots - len(active), len(queue), len(parents), plan.admit_min)
            if k == 0:
                break
            if check is not None:
                check()
            which = [queue.popleft() for _ in range(k)]
            for p in which:
                hyps[p] = _NBest(s)
            rows = cache.free_rows(set(parents), k)
            new_logits = cache.insert(prompts, which, rows)
            before |= set(which)
            n_par, n_tok, n_sums, n_prm, n_seqs = _beam_step(new_logits, np.asarray(which, np.int64),
                                                             [[] for _ in which], np.zeros(k), hyps, s, decode)
            parents += [int(rows[j]) for j in n_par]
            tok, sums, prm, seqs = tok + n_tok, sums + n_sums, prm + n_prm, seqs + n_seqs
            active |= set(n_prm)
        complete = sorted(before - active)
        if complete:
            for p in complete:
                results[p] = hyps.pop(p).ranked(s.num_return_sequences)
            if on_done is not None:
                on_done(complete, [results[p] for p in complete])
        if not parents:
            assert not queue, "prompts left waiting with nothing running"
            break
        logits, beam_row = cache.step(np.asarray(parents), np.asarray(tok),
                                      len(prompts[queue[0]]) if queue else 0)
        beam_prompt, beam_tokens, beam_sums = np.asarray(prm, np.int64), seqs, np.asarray(sums)
    return results


# ----------------------------------------------------------------------------- entry point


def decode_continuous(model: ContinuousStepModel, prompts: Sequence[Sequence[int]], order: Sequence[int],
                      s: DecodingSettings, plan: SlotPlan, row_keys: Sequence[RowKey],
                      decode: Optional[Callable[[Sequence[int]], str]] = None, stats: Optional[DecodeStats] = None,
                      on_done: Optional[Callable[[list[int], list[list[Candidate]]], None]] = None,
                      check: Optional[Callable[[], None]] = None) -> dict[int, list[Candidate]]:
    """Decode `prompts[order]` (longest first) through `plan.slots` slots; each prompt's ranked
    candidates by prompt index. `row_keys[i]` keys prompt i's samples; `on_done(prompts,
    candidates)` as prompts complete; `check()` before each admission (cancellation)."""
    if s.stop_strings and decode is None:
        raise ConfigError("stop strings need a decode callback (token ids -> text)")
    assert supports_continuous(model), f"{type(model).__name__} has no insert/compact: use static batching"
    order = [int(i) for i in order]
    if not order:
        return {}
    lengths = [len(prompts[i]) for i in order]
    assert lengths == sorted(lengths, reverse=True), "continuous batching takes prompts longest first"
    assert lengths[0] + s.max_new_tokens <= plan.columns, (
        f"the longest prompt ({lengths[0]}) + max_new_tokens ({s.max_new_tokens}) exceeds {plan.columns} columns")
    assert plan.slots * s.rows_per_prompt <= plan.max_rows, (plan, s.rows_per_prompt)
    stats = stats if stats is not None else DecodeStats()
    stats.batches += 1
    if s.resolved_strategy == "beam":
        out = _decode_beams(model, prompts, order, s, plan, decode, stats, on_done, check)
    else:
        out = _decode_rows(model, prompts, order, s, plan, row_keys, decode, stats, on_done, check)
    assert sorted(out) == sorted(order), "a prompt was lost"
    stats.generated_tokens += sum(c.num_tokens for cands in out.values() for c in cands)
    return out
