"""Prompts -> token ids, and generated ids -> text, for a generation model (no paddle).

`PromptEncoderSpec` is the picklable recipe (the model's tokenizer.json, chat template, special
tokens, the prompt limit and what to do past it); every tokenizer worker process builds its own
`PromptEncoder` from it, and so does the generation task for detokenizing.

- Chat turns (`messages`, or a plain prompt wrapped as one user turn with `chat=True`) are
  rendered with the model's chat template the way Hugging Face's `apply_chat_template` does
  (jinja2, sandboxed, `trim_blocks` and `lstrip_blocks`, `add_generation_prompt=True`).
- The text is tokenized without adding special tokens (a chat template writes its own); the
  BOS id is put first when the model asks for one (`add_bos_token`) and the text lacks it.
- A prompt longer than `max_prompt_tokens`: `overflow='truncate'` keeps its last tokens (the end
  of a prompt is what the model continues from), `'reject'` rejects the row; either way counted.
- A vocabulary-pruned model (`vocab_map`): the ids become the model's rows. A prompt token that
  is not kept is spelled with the kept single-character tokens of its text instead (byte-level
  BPE: every token is a string of the 256 byte symbols, which pruning always keeps), so the
  prompt's text is unchanged but its segmentation is not; each such token is counted
  (`unknown_tokens`, report.json `tokens.unknown_tokens`). A token that cannot be spelled so
  (another tokenizer family) rejects the row. Generated rows are mapped back by the caller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from pipeline.engine.decoder_modeldir import DecoderModelInfo
from pipeline.engine.text import TokenizeRequest
from pipeline.engine.vocab_map import VocabMap

OVERFLOW = ("truncate", "reject")
PROMPT_KINDS = ("prompts", "messages")  # TokenizeRequest kinds this encoder tokenizes
DETOKENIZE = "detokenize"  # and the kind it detokenizes: `a` holds token-id lists


@dataclass(frozen=True)
class PromptEncoderSpec:
    tokenizer_file: str
    chat_template: str | None
    max_prompt_tokens: int
    overflow: str = "truncate"
    chat: bool = False  # wrap a plain prompt as one user turn of the chat template
    add_bos_token: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None  # the template's `eos_token` (templates that close assistant turns use it)
    vocab_map: VocabMap | None = field(default=None, compare=False)  # pruned models: full ids -> model rows

    def __post_init__(self) -> None:
        assert self.overflow in OVERFLOW, f"overflow must be one of {OVERFLOW}, got {self.overflow!r}"
        assert self.max_prompt_tokens >= 1, self.max_prompt_tokens

    @classmethod
    def of(cls, model: DecoderModelInfo, max_prompt_tokens: int, overflow: str = "truncate",
           chat: bool = False) -> "PromptEncoderSpec":
        return cls(str(model.tokenizer_file), model.chat_template, max_prompt_tokens, overflow, chat,
                   model.add_bos_token, model.special.bos_token_id, model.special.eos_token_ids[0],
                   getattr(model, "vocab_map", None))

    def build(self) -> "PromptEncoder":
        return PromptEncoder(self)


@dataclass
class PromptTokens:
    ids: list[list[int]]  # one per item that did not fail, in item order
    failed: dict[int, str]  # item index -> reason
    seconds: float
    truncated_items: frozenset[int] = frozenset()  # items cut to max_prompt_tokens (overflow='truncate')
    unknown_tokens: int = 0  # pruned models: prompt tokens outside the kept set, spelled out (see the module doc)

    @property
    def truncated(self) -> int:
        return len(self.truncated_items)

    @property
    def sequences(self) -> int:
        return len(self.ids)


@dataclass
class Detokenized:
    texts: list[str]  # one per id list of the request
    seconds: float


class PromptEncoder:
    def __init__(self, spec: PromptEncoderSpec):
        from tokenizers import Tokenizer

        self.spec = spec
        self.tokenizer = Tokenizer.from_file(spec.tokenizer_file)

    @cached_property
    def _template(self):
        if self.spec.chat_template is None:
            return None
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.spec.chat_template)

    def _token(self, i: int | None) -> str:
        return "" if i is None else (self.tokenizer.id_to_token(i) or "")

    def render(self, messages: list[dict]) -> str:
        """Chat turns -> the model's prompt text (ending with the assistant's turn opening)."""
        if self._template is None:
            raise ValueError("the model has no chat template, so chat messages (or --chat) cannot be rendered; "
                             "give plain prompts")
        return self._template.render(messages=messages, add_generation_prompt=True,
                                     bos_token=self._token(self.spec.bos_token_id),
                                     eos_token=self._token(self.spec.eos_token_id))

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.spec.bos_token_id
        if self.spec.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def run(self, req: TokenizeRequest) -> PromptTokens | Detokenized:
        """Item i of `req.a` (a prompt string, or a list of chat turns for kind 'messages') ->
        its ids; a row whose template or tokenizer raises, or that is too long with
        overflow='reject', is reported in `failed`, not fatal. Kind 'detokenize': id lists ->
        texts (`decode`)."""
        t0 = time.perf_counter()
        if req.kind == DETOKENIZE:
            return Detokenized(self.tokenizer.decode_batch([list(i) for i in req.a], skip_special_tokens=True),
                               time.perf_counter() - t0)
        assert req.kind in PROMPT_KINDS, f"kind must be one of {PROMPT_KINDS} or {DETOKENIZE!r}, got {req.kind!r}"
        limit, out, failed, truncated = self.spec.max_prompt_tokens, [], {}, set()
        unknown = 0
        for i, item in enumerate(req.a):
            try:
                if req.kind == "messages":
                    text = self.render(item)
                elif self.spec.chat:
                    text = self.render([{"role": "user", "content": item}])
                else:
                    text = item
                ids = self._ids(text)
                if self.spec.vocab_map is not None:
                    ids, n_unknown = self._to_rows(ids)
                    unknown += n_unknown
            except Exception as e:  # noqa: BLE001 - a template or tokenizer failure rejects the row
                failed[i] = f"prompt error: {type(e).__name__}: {e}"
                continue
            if not ids:
                failed[i] = "the prompt tokenizes to no tokens"
                continue
            if len(ids) > limit:
                if self.spec.overflow == "reject":
                    failed[i] = (f"the prompt has {len(ids)} tokens, more than --max-prompt-tokens {limit} "
                                 f"(--prompt-overflow reject)")
                    continue
                ids = ids[-limit:]
                truncated.add(i)
            out.append(ids)
        return PromptTokens(out, failed, time.perf_counter() - t0, frozenset(truncated), unknown)

    def _to_rows(self, ids: list[int]) -> tuple[list[int], int]:
        """Full ids -> the pruned model's rows, and how many tokens were not kept (each spelled
        with the kept tokens of its characters); ValueError for one that cannot be spelled."""
        vm = self.spec.vocab_map
        rows = vm.rows(ids)
        if (rows >= 0).all():
            return rows.tolist(), 0
        out, unknown = [], 0
        for i, r in zip(ids, rows.tolist()):
            if r >= 0:
                out.append(r)
                continue
            token = self.tokenizer.id_to_token(int(i)) or ""
            chars = [self.tokenizer.token_to_id(ch) for ch in token]
            spelled = vm.rows([-1 if c is None else c for c in chars]) if chars else np.array([-1])
            if (spelled < 0).any():
                raise ValueError(f"token {i} ({token!r}) is outside the pruned vocabulary and its characters are "
                                 f"not all kept tokens; prune again with this data")
            out += spelled.tolist()
            unknown += 1
        return out, unknown

    def decode(self, ids) -> str:
        """Generated ids -> text, special tokens (EOS, chat markers) left out."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
