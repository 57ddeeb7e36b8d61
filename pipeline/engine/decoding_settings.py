"""What decoding takes and returns (no paddle): `DecodingSettings` (checked once, when made),
the ranked `Candidate`s of a prompt and the `DecodeStats` of a call. See `engine/decoding.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from pipeline.errors import ConfigError

EOS, LENGTH, STOP = "eos", "length", "stop"  # a candidate's finish reason


@dataclass(frozen=True)
class DecodingSettings:
    max_new_tokens: int = 64
    strategy: str = "auto"  # auto: beam if num_beams > 1, else sample if do_sample, else greedy
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False  # True, False (HF's heuristic) or "never"
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off (HF's default of 50 is not assumed)
    top_p: float = 1.0  # 1.0: off
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    stop_strings: tuple[str, ...] = ()
    drop_finished: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        need(self.strategy in ("auto", "greedy", "beam", "sample"), f"unknown decoding strategy {self.strategy!r}")
        need(self.num_beams >= 1, f"--num-beams must be >= 1, got {self.num_beams}")
        need(self.num_return_sequences >= 1, f"--num-return-sequences must be >= 1, got {self.num_return_sequences}")
        need(self.early_stopping in (True, False, "never"),
             f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        need(self.temperature > 0, f"--temperature must be > 0 (use greedy decoding for 0), got {self.temperature}")
        need(self.top_k >= 0, f"--top-k must be >= 0 (0: off), got {self.top_k}")
        need(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        need(all(isinstance(s, str) and s for s in self.stop_strings), "stop strings must be non-empty strings")
        s = self.resolved_strategy
        need(not (self.do_sample and self.num_beams > 1), "beam sampling is not supported: "
             "use --num-beams 1 with sampling, or beam search without it")
        need(s != "greedy" or self.num_return_sequences == 1,
             "greedy decoding returns one sequence: use --num-beams or sampling for --num-return-sequences > 1")
        need(s != "beam" or self.num_return_sequences <= self.num_beams,
             f"--num-return-sequences {self.num_return_sequences} exceeds --num-beams {self.num_beams}")

    @property
    def resolved_strategy(self) -> str:
        if self.strategy != "auto":
            return self.strategy
        return "beam" if self.num_beams > 1 else "sample" if self.do_sample else "greedy"

    @property
    def rows_per_prompt(self) -> int:
        """Model rows one prompt decodes as (what the memory budget multiplies by)."""
        s = self.resolved_strategy
        return self.num_beams if s == "beam" else self.num_return_sequences if s == "sample" else 1


@dataclass(frozen=True)
class Candidate:
    token_ids: tuple[int, ...]  # generated tokens, the EOS that ended them included
    sum_logprob: float
    score: float  # what candidates are ranked by: beam score, or mean log-probability
    finish_reason: str  # 'eos' | 'length' | 'stop'
    stop_string: Optional[str] = None  # the stop string found (earliest in the text) if 'stop'

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / len(self.token_ids)


@dataclass
class DecodeStats:
    prompts: int = 0
    batches: int = 0
    prompt_tokens: int = 0  # real prompt tokens
    padded_prompt_tokens: int = 0  # prefill columns x rows
    generated_tokens: int = 0  # tokens of the returned candidates
    step_calls: int = 0
    row_steps: int = 0  # rows fed to step calls, summed: the decode compute
    selects: int = 0
    idle_row_steps: int = 0  # of row_steps, rows fed padding (finished or empty): compute that made no token
    idle_row_steps_waiting: int = 0  # of those, while prompts of the same run waited for a slot
    inserts: int = 0  # continuous batching: prefill calls that put waiting prompts into freed rows
    inserted_prompts: int = 0  # prompts those calls admitted
    compactions: int = 0  # continuous batching: times the cache's unused leading columns were dropped
