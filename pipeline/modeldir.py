"""The runtime model directory: what `convert` writes and the predictor loads.

A runtime directory holds `inference.pdmodel` + `inference.pdiparams` (the exported Paddle
Inference program), `vocab.txt`, and `model.json`, which describes everything the rest of the
pipeline needs without importing paddle: architecture, scoring mode, pooling, max length,
tokenizer settings, precision and checksums. This module only reads and checks it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

MODEL_JSON = "model.json"
PROGRAM_FILE = "inference.pdmodel"
PARAMS_FILE = "inference.pdiparams"
VOCAB_FILE = "vocab.txt"
FORMAT_VERSION = 1


class ModelDirError(Exception):
    """The model directory is missing, incomplete or inconsistent; the message says what to fix."""


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def count_vocab(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


@dataclass(frozen=True)
class TokenizerSettings:
    lowercase: bool
    handle_chinese_chars: bool = True
    strip_accents: bool | None = None  # None: strip when lower-casing (BERT's rule)


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    mode: str  # 'cross' | 'bi'
    pooling: str  # 'cls' | 'mean'
    max_seq_len: int
    max_position_embeddings: int
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    precision: str
    tokenizer: TokenizerSettings
    source_sha256: str
    raw: dict

    @property
    def program_file(self) -> Path:
        return self.path / PROGRAM_FILE

    @property
    def params_file(self) -> Path:
        return self.path / PARAMS_FILE

    @property
    def vocab_file(self) -> Path:
        return self.path / VOCAB_FILE

    @property
    def checksum(self) -> str:
        """Identifies the converted model: the params file's sha256 recorded at conversion."""
        return self.raw.get("params_sha256", "")


def load_model_info(path: str | Path, check_vocab: bool = True) -> ModelInfo:
    """Read and check a runtime model directory; fail with a message naming what is wrong."""
    path = Path(path)
    hint = "convert a checkpoint with `python -m pipeline convert SRC DST`"
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist; {hint}")
    meta_path = path / MODEL_JSON
    if not meta_path.is_file():
        raise ModelDirError(f"{meta_path} is missing: {path} is not a runtime model directory; {hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        arch = meta["architecture"]
        info = ModelInfo(
            path=path,
            name=str(meta["name"]),
            mode=str(meta["mode"]),
            pooling=str(meta["pooling"]),
            max_seq_len=int(meta["max_seq_len"]),
            max_position_embeddings=int(arch["max_position_embeddings"]),
            vocab_size=int(arch["vocab_size"]),
            hidden_size=int(arch["hidden_size"]),
            num_hidden_layers=int(arch["num_hidden_layers"]),
            precision=str(meta["precision"]),
            tokenizer=TokenizerSettings(**meta["tokenizer"]),
            source_sha256=str(meta["source"]["sha256"]),
            raw=meta,
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ModelDirError(f"{meta_path} is corrupt ({type(e).__name__}: {e}); re-run the conversion with --force") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(
            f"{meta_path} has format_version {meta.get('format_version')!r}, this version reads "
            f"{FORMAT_VERSION}; re-run the conversion with --force"
        )
    for f in (info.program_file, info.params_file, info.vocab_file):
        if not f.is_file() or f.stat().st_size == 0:
            raise ModelDirError(f"{f} is missing or empty; re-run the conversion with --force")
    if check_vocab:
        n = count_vocab(info.vocab_file)
        if n != info.vocab_size:
            raise ModelDirError(
                f"{info.vocab_file} has {n} tokens but the model's embedding table has "
                f"{info.vocab_size} rows: vocab and weights do not belong together"
            )
    return info
