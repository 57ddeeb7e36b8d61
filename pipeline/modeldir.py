"""The runtime model directory: what `convert` writes and the predictor loads.

A runtime directory holds `inference.pdmodel` + `inference.pdiparams` (the exported Paddle
Inference program), `vocab.txt`, and `model.json`, which describes everything the rest of the
pipeline needs without importing paddle: architecture, scoring mode, pooling, max length,
tokenizer settings, precision and checksums. This module only reads and checks it.

A vocabulary-pruned directory (`python -m pipeline prune-vocab`, see `pipeline/prune.py`) also
holds `id_map.npy`: the full `vocab.txt` still drives WordPiece, and the map turns its ids into
rows of the smaller embedding table. Its `model.json` has a `pruning` object with the map's
checksum, which is verified here so a map and a model that do not belong together never run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

MODEL_JSON = "model.json"
PROGRAM_FILE = "inference.pdmodel"
PARAMS_FILE = "inference.pdiparams"
VOCAB_FILE = "vocab.txt"
ID_MAP_FILE = "id_map.npy"  # pruned models only: full-vocab id -> embedding row
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
    id_map_file: Path | None = None  # set for vocabulary-pruned models (ids go through it)

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
    if "pruning" in meta:
        return _check_pruned(info, meta_path, check_vocab)
    if check_vocab:
        n = count_vocab(info.vocab_file)
        if n != info.vocab_size:
            raise ModelDirError(
                f"{info.vocab_file} has {n} tokens but the model's embedding table has "
                f"{info.vocab_size} rows: vocab and weights do not belong together"
            )
    return info


def load_id_map(path: Path) -> np.ndarray:
    """The id map of a pruned model as int64 (the dtype numpy indexes with fastest)."""
    return np.load(path, allow_pickle=False).astype(np.int64)


def _check_pruned(info: ModelInfo, meta_path: Path, check_vocab: bool) -> ModelInfo:
    """A pruned model keeps the full vocab.txt, so the vocab must match the map (one entry per
    token) and the map must point into the embedding table; the map's checksum must be the one
    recorded when the model was pruned (a map from another pruning would silently change ids)."""
    fix = "prune again with `python -m pipeline prune-vocab SOURCE_MODEL --data ... --out DIR --force`"
    try:
        pruning = info.raw["pruning"]
        map_file = info.path / str(pruning["map_file"])
        want_sha = str(pruning["map_sha256"])
    except (KeyError, TypeError) as e:
        raise ModelDirError(f"{meta_path}: the 'pruning' record is corrupt ({type(e).__name__}: {e}); {fix}") from e
    if not map_file.is_file():
        raise ModelDirError(f"{map_file} is missing: {info.path} is a pruned model and needs its id map; {fix}")
    got_sha = sha256_file(map_file)
    if got_sha != want_sha:
        raise ModelDirError(
            f"{map_file} has sha256 {got_sha[:12]}..., but {meta_path} records {want_sha[:12]}...: the id map "
            f"does not belong to this pruned model and would feed it the wrong embedding rows; {fix}"
        )
    if check_vocab:
        try:
            id_map = np.load(map_file, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ModelDirError(f"{map_file} is not a readable .npy array ({e}); {fix}") from e
        n = count_vocab(info.vocab_file)
        if id_map.ndim != 1 or id_map.dtype.kind not in "iu" or len(id_map) != n:
            raise ModelDirError(
                f"{map_file} holds a {id_map.dtype} array of shape {id_map.shape}, but {info.vocab_file} has "
                f"{n} tokens: the map needs one integer per vocab entry; {fix}"
            )
        if len(id_map) and (int(id_map.min()) < 0 or int(id_map.max()) >= info.vocab_size):
            raise ModelDirError(
                f"{map_file} points outside the model's {info.vocab_size}-row embedding table "
                f"(values {int(id_map.min())}..{int(id_map.max())}); {fix}"
            )
    return replace(info, id_map_file=map_file)


def write_model_json(folder: Path, meta: dict, json_default=None) -> None:
    """model.json for a runtime directory whose program, params and vocab are already written;
    the params and vocab checksums are computed here so they always describe those files."""
    meta = {**meta, "params_sha256": sha256_file(folder / PARAMS_FILE), "vocab_sha256": sha256_file(folder / VOCAB_FILE)}
    (folder / MODEL_JSON).write_text(json.dumps(meta, indent=2, default=json_default) + "\n", encoding="utf-8")


class Staging:
    """A runtime directory being written: `path` to fill; `discard()` to drop it at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.keep = True

    def discard(self) -> None:
        self.keep = False


@contextmanager
def staged_dir(dst: Path) -> Iterator[Staging]:
    """Write a runtime directory in a temporary folder beside `dst` and move it into place only
    when the block ends normally (replacing `dst`; callers refuse an existing `dst` without
    --force beforehand). A failure or `discard()` leaves nothing behind, so a directory that
    exists is complete."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = Staging(Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent)))
    stage.path.chmod(0o755)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage.path, ignore_errors=True)
        raise
    if not stage.keep:
        shutil.rmtree(stage.path, ignore_errors=True)
        return
    if dst.exists():
        shutil.rmtree(dst)
    stage.path.rename(dst)
