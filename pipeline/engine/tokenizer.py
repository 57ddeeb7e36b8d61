"""ERNIE/BERT WordPiece tokenization into ragged id arrays (no paddle).

WordPiece itself is the HF `tokenizers` implementation (identical ids to PaddleNLP's
`ErnieTokenizer`, about 4x faster; tests/test_tokenizer.py proves the identity on mixed
Chinese/English text). Special tokens and pair truncation are assembled here in numpy, so the
rule is explicit and the same for text and pre-tokenized input:

- cross: `[CLS] query [SEP] doc [SEP]`, token types 0/1, longest-first truncation (the longer
  side loses a token until the pair fits; on a tie the doc loses first, as PaddleNLP does).
- bi: `[CLS] text [SEP]`, truncated to max_seq_len.

Sequences travel between processes as `Ragged`: one flat array plus offsets, cheap to pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.engine.modeldir import ModelDirError, TokenizerSettings

# A text longer than this many characters per wanted token is cut before tokenizing, so a
# 1 MB field costs no more than a normal one (see `WordPieceTokenizer.token_ids`).
CHARS_PER_TOKEN_BOUND = 32


@dataclass
class Ragged:
    """n variable-length int sequences: `flat[offsets[i]:offsets[i+1]]` is sequence i."""

    flat: np.ndarray  # int64
    offsets: np.ndarray  # int64, length n + 1

    @classmethod
    def from_lists(cls, seqs) -> "Ragged":
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(offsets[-1]))
        return cls(flat, offsets)

    @classmethod
    def concat(cls, parts: list["Ragged"]) -> "Ragged":
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(1, np.int64))
        flat = np.concatenate([p.flat for p in parts])
        shifts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)])
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i]:self.offsets[i + 1]]

    def take(self, idx: np.ndarray) -> "Ragged":
        return Ragged.from_lists([self[int(i)] for i in idx])


@dataclass
class Encoded:
    """Model-ready sequences (special tokens included) with their token types."""

    ids: Ragged
    types: Ragged

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return self.ids.lengths

    @classmethod
    def concat(cls, parts: list["Encoded"]) -> "Encoded":
        return cls(Ragged.concat([p.ids for p in parts]), Ragged.concat([p.types for p in parts]))


def read_vocab(path: str | Path) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths kept by longest-first truncation of a pair to `budget` tokens, in closed form.

    Equivalent to: while a + b > budget: drop one token from the longer, the second on a tie.
    """
    excess = len_a + len_b - budget
    if excess <= 0:
        return len_a, len_b
    gap = abs(len_a - len_b)
    if gap >= excess:  # only the longer side loses tokens
        return (len_a - excess, len_b) if len_a > len_b else (len_a, len_b - excess)
    rest = excess - gap  # both now equal; they alternate, the second side first
    m = min(len_a, len_b)
    return m - rest // 2, m - (rest + 1) // 2


class WordPieceTokenizer:
    def __init__(self, vocab_file: str | Path, settings: TokenizerSettings):
        from tokenizers import BertWordPieceTokenizer

        vocab = read_vocab(vocab_file)
        missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in vocab]
        if missing:
            raise ModelDirError(f"{vocab_file} lacks the special tokens {missing}, which every sequence needs: "
                                f"it is not a BERT/ERNIE WordPiece vocab; convert the checkpoint with its own vocab.txt")
        self.cls_id, self.sep_id = vocab["[CLS]"], vocab["[SEP]"]
        self.pad_id, self.unk_id = vocab["[PAD]"], vocab["[UNK]"]
        self.vocab_size = len(vocab)
        self._tok = BertWordPieceTokenizer(
            str(vocab_file),
            lowercase=settings.lowercase,
            handle_chinese_chars=settings.handle_chinese_chars,
            strip_accents=settings.strip_accents,
            clean_text=True,
        )
        self._tok.no_truncation()
        self._tok.no_padding()

    def token_ids(self, texts: list[str], max_tokens: int) -> list[list[int]]:
        """WordPiece ids of each text without special tokens, at most `max_tokens` each.

        A long text is cut at a whitespace boundary before tokenizing; if the cut text still
        yields `max_tokens` tokens, those are exactly the first tokens of the whole text (a
        word is never split by the cut). Otherwise the whole text is tokenized.
        """
        limit = max_tokens * CHARS_PER_TOKEN_BOUND
        cut = [t if len(t) <= limit else t[: t.rfind(" ", 0, limit) + 1 or limit] for t in texts]
        out = [e.ids[:max_tokens] for e in self._tok.encode_batch(cut, add_special_tokens=False)]
        for i, (text, short) in enumerate(zip(texts, cut)):
            if len(short) < len(text) and len(out[i]) < max_tokens:
                out[i] = self._tok.encode(text, add_special_tokens=False).ids[:max_tokens]
        return out

    def encode_single(self, texts: list[str], max_seq_len: int) -> Encoded:
        """bi mode: `[CLS] text [SEP]` per text."""
        assert max_seq_len >= 3, f"max_seq_len must be >= 3, got {max_seq_len}"
        seqs = [[self.cls_id, *ids, self.sep_id] for ids in self.token_ids(texts, max_seq_len - 2)]
        ids = Ragged.from_lists(seqs)
        return Encoded(ids, Ragged(np.zeros_like(ids.flat), ids.offsets.copy()))

    def encode_pairs(self, queries: list[str], docs: list[str], max_seq_len: int) -> Encoded:
        """cross mode: `[CLS] query [SEP] doc [SEP]` with longest-first truncation."""
        assert len(queries) == len(docs), "queries and docs must pair up"
        budget = max_seq_len - 3
        # No side can keep more than the whole budget, so tokenizing beyond it is wasted work.
        qs, ds = self.token_ids(queries, budget), self.token_ids(docs, budget)
        return assemble_pairs(qs, ds, max_seq_len, self.cls_id, self.sep_id)


def assemble_pairs(qs: list, ds: list, max_seq_len: int, cls_id: int, sep_id: int) -> Encoded:
    budget = max_seq_len - 3
    seqs, types = [], []
    for q, d in zip(qs, ds):
        nq, nd = longest_first(len(q), len(d), budget)
        seqs.append([cls_id, *q[:nq], sep_id, *d[:nd], sep_id])
        types.append([0] * (nq + 2) + [1] * (nd + 1))
    return Encoded(Ragged.from_lists(seqs), Ragged.from_lists(types))


def fit_pretokenized(input_ids: list[list[int]], token_type_ids: list[list[int]], max_seq_len: int,
                     sep_id: int) -> tuple[Encoded, int]:
    """Pre-tokenized pairs as shipped (special tokens included); longer ones are cut to
    max_seq_len and end in [SEP]. Returns the sequences and how many were cut."""
    cut = 0
    ids_out, types_out = [], []
    for ids, types in zip(input_ids, token_type_ids):
        if len(ids) > max_seq_len:
            cut += 1
            ids, types = list(ids[: max_seq_len - 1]) + [sep_id], list(types[:max_seq_len])
        ids_out.append(ids)
        types_out.append(types)
    return Encoded(Ragged.from_lists(ids_out), Ragged.from_lists(types_out)), cut
