"""Text -> model-ready sequences for one model (no paddle): the tokenizer plus, for
vocabulary-pruned models, the id map, held per instance so two models can live in one process.

`TextEncoderSpec` is the picklable recipe (vocab file, tokenizer settings, id map file): the
engine builds its own `TextEncoder` from it, and so does every tokenizer worker process of a job.
A `TokenizeRequest` is one unit of work (a chunk's pairs, texts or pre-tokenized ids);
`TextEncoder.run` turns it into a `TokenizeResult`, rejecting only the rows that make the
tokenizer raise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.engine.modeldir import ModelInfo, TokenizerSettings, load_id_map
from pipeline.engine.tokenizer import Encoded, WordPieceTokenizer, fit_pretokenized

REQUEST_KINDS = ("pairs", "texts", "pretokenized", "prompts", "messages", "detokenize")  # the last three: engine/prompt_text.py


@dataclass(frozen=True)
class TextEncoderSpec:
    vocab_file: str
    tokenizer: TokenizerSettings
    id_map_file: str | None = None  # vocabulary-pruned models

    @classmethod
    def of(cls, model: ModelInfo) -> "TextEncoderSpec":
        return cls(str(model.vocab_file), model.tokenizer, str(model.id_map_file) if model.id_map_file else None)

    def build(self) -> "TextEncoder":
        return TextEncoder(self)


@dataclass
class TokenizeRequest:
    kind: str  # one of REQUEST_KINDS
    max_seq_len: int
    a: list  # queries | texts | input_ids
    b: list | None = None  # docs | None | token_type_ids

    def __post_init__(self) -> None:
        assert self.kind in REQUEST_KINDS, f"kind must be one of {REQUEST_KINDS}, got {self.kind!r}"


@dataclass
class TokenizeResult:
    enc: Encoded  # one sequence per item that did not fail
    failed: dict[int, str]  # item index -> reason
    seconds: float
    truncated: int = 0  # pre-tokenized sequences cut to max_seq_len
    unknown_tokens: int = 0  # pruned models: tokens outside the kept vocabulary, now [UNK]

    @property
    def sequences(self) -> int:
        return len(self.enc)


class TextEncoder:
    def __init__(self, spec: TextEncoderSpec):
        self.spec = spec
        self.tokenizer = WordPieceTokenizer(spec.vocab_file, spec.tokenizer)  # checks the special tokens
        self.id_map = load_id_map(Path(spec.id_map_file)) if spec.id_map_file else None

    @property
    def pad_id(self) -> int:
        """The padding id as the model sees it (a pruned model's row of [PAD])."""
        pad = self.tokenizer.pad_id
        return pad if self.id_map is None else int(self.id_map[pad])

    def map_ids(self, enc: Encoded) -> int:
        """Pruned models: WordPiece ran on the full vocab; its ids become rows of the pruned table
        here (ids that were not kept become [UNK]). Returns how many tokens fell to [UNK] that way;
        tokens that were [UNK] already are not counted."""
        if self.id_map is None:
            return 0
        ids, unk = enc.ids.flat, self.tokenizer.unk_id
        if ids.size and int(ids.max()) >= len(self.id_map):
            raise ValueError(f"token id {int(ids.max())} is outside the model's {len(self.id_map)}-token vocabulary")
        mapped = self.id_map[ids]
        enc.ids.flat = mapped
        return int(np.count_nonzero((mapped == self.id_map[unk]) & (ids != unk)))

    def _encode(self, kind: str, a: list, b: list | None, max_seq_len: int) -> tuple[Encoded, int, int]:
        tok = self.tokenizer
        if kind == "pairs":
            enc, cut = tok.encode_pairs(a, b, max_seq_len), 0
        elif kind == "texts":
            enc, cut = tok.encode_single(a, max_seq_len), 0
        else:
            enc, cut = fit_pretokenized(a, b, max_seq_len, tok.sep_id)
        return enc, cut, self.map_ids(enc)

    def run(self, req: TokenizeRequest) -> TokenizeResult:
        """A row that makes the tokenizer raise is reported in `failed`, not fatal."""
        t0 = time.perf_counter()
        failed: dict[int, str] = {}
        try:
            enc, truncated, unknown = self._encode(req.kind, req.a, req.b, req.max_seq_len)
        except Exception:  # find the culprit rows one by one; the others are encoded as usual
            parts, truncated, unknown = [], 0, 0
            for i in range(len(req.a)):
                try:
                    e, t, u = self._encode(req.kind, req.a[i:i + 1], None if req.b is None else req.b[i:i + 1],
                                           req.max_seq_len)
                    parts.append(e)
                    truncated += t
                    unknown += u
                except Exception as ex:  # noqa: BLE001 - any tokenizer failure is a row-level reject
                    failed[i] = f"tokenizer error: {type(ex).__name__}: {ex}"
            enc = Encoded.concat(parts)
        return TokenizeResult(enc, failed, time.perf_counter() - t0, truncated, unknown)

    def texts(self, texts: list[str], max_seq_len: int) -> Encoded:
        """`[CLS] text [SEP]` per text, ids mapped; raises on a text the tokenizer refuses."""
        enc, _, _ = self._encode("texts", texts, None, max_seq_len)
        return enc

    def pairs(self, queries: list[str], docs: list[str], max_seq_len: int) -> Encoded:
        enc, _, _ = self._encode("pairs", queries, docs, max_seq_len)
        return enc
