"""The vocabulary map of a vocabulary-pruned decoder (`convert/decoder_prune.py`; no paddle).

A pruned decoder's embedding and output head hold only the kept rows. `vocab_map.npy` lists,
per model row, the full-vocabulary id it stands for (int32, ascending). The tokenizer keeps the
full vocabulary (byte-level BPE on a shrunken vocab would segment text differently), so:

- prompt ids are mapped full -> row before the model (`rows`; an id that is not kept is -1,
  and the prompt encoder decides what to do with it: see `prompt_text.PromptEncoder`);
- generated rows are mapped row -> full after it (`full`), so outputs (token ids in
  generations.jsonl, detokenization) are in the full vocabulary, as with the unpruned model;
- the special tokens (EOS, pad) the decoding loop compares with are mapped to rows
  (`model_special_tokens`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

VOCAB_MAP_FILE = "vocab_map.npy"


@dataclass(frozen=True)
class VocabMap:
    kept: np.ndarray = field(repr=False)  # int64 [rows]: model row -> full id, strictly ascending
    full_size: int  # ids of the full vocabulary
    row_of: np.ndarray = field(init=False, repr=False)  # int64 [full_size]: full id -> row, -1 if not kept

    def __post_init__(self) -> None:
        kept = np.asarray(self.kept, dtype=np.int64)
        assert kept.ndim == 1 and len(kept) >= 1, f"a vocab map needs at least one row, got shape {kept.shape}"
        assert (np.diff(kept) > 0).all(), "vocab map rows must list full ids in strictly ascending order"
        assert 0 <= kept[0] and kept[-1] < self.full_size, (
            f"vocab map ids {kept[0]}..{kept[-1]} outside the full vocabulary of {self.full_size}")
        row_of = np.full(self.full_size, -1, dtype=np.int64)
        row_of[kept] = np.arange(len(kept))
        object.__setattr__(self, "kept", kept)
        object.__setattr__(self, "row_of", row_of)

    @property
    def rows_kept(self) -> int:
        return len(self.kept)

    def rows(self, ids) -> np.ndarray:
        """Full ids -> model rows (-1 where the id is not kept; ids outside the vocabulary too)."""
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < self.full_size)
        return np.where(inside, self.row_of[np.clip(ids, 0, self.full_size - 1)], -1)

    def full(self, rows) -> np.ndarray:
        """Model rows -> full ids."""
        rows = np.asarray(rows, dtype=np.int64)
        assert rows.size == 0 or (rows.min() >= 0 and rows.max() < len(self.kept)), (
            f"rows outside the {len(self.kept)} rows of the pruned model")
        return self.kept[rows]


def vocab_map_bytes(kept: np.ndarray) -> bytes:
    """The bytes of vocab_map.npy for the kept full ids (int32, ascending)."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(kept, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


@lru_cache(maxsize=8)
def _read(path: str, sha256: str, full_size: int, rows: int) -> VocabMap:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: {e}; prune again with `prune-vocab ... --force`") from e
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ValueError(f"{path} has sha256 {got}, model.json records {sha256}: the map does not belong to this "
                         f"model; prune again with `prune-vocab ... --force`")
    import io

    kept = np.load(io.BytesIO(data), allow_pickle=False)
    if kept.ndim != 1 or kept.dtype.kind not in "iu" or len(kept) != rows:
        raise ValueError(f"{path} holds a {kept.dtype} array of shape {kept.shape}; the model has {rows} rows")
    try:
        return VocabMap(kept, full_size)
    except AssertionError as e:
        raise ValueError(f"{path}: {e}") from e


def read_vocab_map(path: Path, sha256: str, full_size: int, rows: int) -> VocabMap:
    """vocab_map.npy, checked against its recorded checksum and the model's sizes (ValueError)."""
    return _read(str(path), sha256, int(full_size), int(rows))
