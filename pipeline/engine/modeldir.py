"""The runtime model directory: what the converters write and the engine loads (no paddle).

A runtime directory holds `inference.pdmodel` + `inference.pdiparams` (the exported Paddle
Inference program), `vocab.txt`, and `model.json`, which describes everything the rest of the
pipeline needs without importing paddle. `load_model_info` reads `model.json` in this one place
into a typed `ModelInfo`; nothing else reads it by string key.

- `task`: which task of `pipeline.tasks` the model serves ('cross' or 'bi' scoring today);
- `inputs`: the exported program's input names, in order, as the converter wrote them;
- `pruning` (vocabulary-pruned directories, `prune-vocab`): the full `vocab.txt` still drives
  WordPiece and `id_map.npy` turns its ids into rows of the smaller embedding table; the map's
  checksum is verified here so a map and a model that do not belong together never run;
- `quantization` (int8 directories, `quantize`): which op types run int8 and the gate result;
- `gates` (written by `gate`): per runtime precision of this very directory (bf16), the quality
  gate's record; `--precision auto` uses a precision only where `passed` is true.

Format 1 directories (before `task` and `inputs` were written) are read too: their task is their
`mode` and their inputs follow from `architecture.position_ids_input`, in `_upgrade_v1` alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline.engine.decoder_modeldir import DecoderModelInfo, is_decoder_meta, parse_decoder_meta, required_files

MODEL_JSON = "model.json"
PROGRAM_FILE = "inference.pdmodel"
PARAMS_FILE = "inference.pdiparams"
VOCAB_FILE = "vocab.txt"
ID_MAP_FILE = "id_map.npy"  # pruned models only: full-vocab id -> embedding row
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
ENCODER_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
POSITION_IDS = "position_ids"  # a fourth input of `convert --target gpu` exports


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


SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[UNK]")  # every sequence of a WordPiece model needs them


def check_vocab_file(path: Path) -> int:
    """The number of tokens of a WordPiece vocab.txt; refuses one without the special tokens."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    tokens, n = set(lines), len(lines)
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise ModelDirError(f"{path} lacks the special tokens {missing}, which every sequence needs: it is not "
                            f"a BERT/ERNIE WordPiece vocab; convert the checkpoint with its own vocab.txt")
    return n


@dataclass(frozen=True)
class TokenizerSettings:
    lowercase: bool
    handle_chinese_chars: bool = True
    strip_accents: bool | None = None  # None: strip when lower-casing (BERT's rule)


@dataclass(frozen=True)
class Pruning:
    """model.json "pruning": how a vocabulary-pruned directory was made."""

    source_path: str
    source_params_sha256: str
    source_vocab_size: int
    ids_kept: int
    keep_top: int
    data: tuple[dict, ...]  # {"file", "sha256"} per pruning data file
    data_rows: int
    map_file: str
    map_sha256: str
    unk_row: int


@dataclass(frozen=True)
class Quantization:
    """model.json "quantization": the int8 record (method, calibration, gate) of a quantised model."""

    onednn_int8_ops: tuple[str, ...]
    source_params_sha256: str
    int8_linears: tuple[str, ...]
    gate_passed: bool | None  # None until the gate ran
    record: dict = field(repr=False, compare=False)  # the whole record, for reports


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    task: str  # a name in pipeline.tasks.TASKS: 'cross' | 'bi'
    pooling: str  # 'cls' | 'mean'
    output: str  # 'score' | 'embedding'
    max_seq_len: int
    max_position_embeddings: int
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    precision: str  # 'fp32' | 'int8'
    attention: str  # 'fused_qkv' (CPU export) | 'separate_qkv' (`--target gpu`)
    inputs: tuple[str, ...]  # the program's input names, in order
    tokenizer: TokenizerSettings
    source_sha256: str
    checksum: str  # the params file's sha256 recorded at conversion: identifies the model
    program_revision: int
    architecture: dict = field(repr=False)  # the model module's config (convert.model.ErnieConfig)
    meta: dict = field(repr=False, compare=False)  # model.json as written: converters derive from it
    pruning: Pruning | None = None
    quantization: Quantization | None = None
    id_map_file: Path | None = None  # set for vocabulary-pruned models (ids go through it)
    # model.json "gates": precision -> its gate record ("passed", "forced", the metrics), for the
    # runtime precisions gated on this very directory (`python -m pipeline gate`: bf16).
    gates: dict = field(default_factory=dict, compare=False)

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
    def takes_position_ids(self) -> bool:
        return POSITION_IDS in self.inputs


def _upgrade_v1(meta: dict) -> dict:
    """Format 1 -> 2: `mode` became `task`; the input names were derived, now they are written."""
    arch = meta.get("architecture", {})
    inputs = list(ENCODER_INPUTS) + ([POSITION_IDS] if arch.get("position_ids_input") else [])
    return {**meta, "task": meta.get("mode"), "inputs": inputs}


def _quantization(q: dict) -> Quantization:
    gate = q.get("gate")
    return Quantization(
        onednn_int8_ops=tuple(q.get("onednn_int8_ops", ["fc"])),
        source_params_sha256=str(q.get("source_params_sha256", "")),
        int8_linears=tuple(q.get("method", {}).get("int8_linears", ())),
        gate_passed=None if gate is None else bool(gate["passed"]),
        record=q,
    )


def _pruning(p: dict) -> Pruning:
    return Pruning(
        source_path=str(p["source_path"]), source_params_sha256=str(p["source_params_sha256"]),
        source_vocab_size=int(p["source_vocab_size"]), ids_kept=int(p["ids_kept"]), keep_top=int(p["keep_top"]),
        data=tuple(p["data"]), data_rows=int(p["data_rows"]), map_file=str(p["map_file"]),
        map_sha256=str(p["map_sha256"]), unk_row=int(p["unk_row"]),
    )


def _parse(path: Path, meta: dict) -> ModelInfo:
    arch = meta["architecture"]
    return ModelInfo(
        path=path, name=str(meta["name"]), task=str(meta["task"]), pooling=str(meta["pooling"]),
        output=str(meta.get("output", "score" if meta["task"] == "cross" else "embedding")),
        max_seq_len=int(meta["max_seq_len"]),
        max_position_embeddings=int(arch["max_position_embeddings"]), vocab_size=int(arch["vocab_size"]),
        hidden_size=int(arch["hidden_size"]), num_hidden_layers=int(arch["num_hidden_layers"]),
        precision=str(meta["precision"]), attention=str(meta.get("attention", "fused_qkv")),
        inputs=tuple(str(n) for n in meta["inputs"]), tokenizer=TokenizerSettings(**meta["tokenizer"]),
        source_sha256=str(meta["source"]["sha256"]), checksum=str(meta.get("params_sha256", "")),
        program_revision=int(meta.get("program_revision", 1)), architecture=dict(arch), meta=meta,
        pruning=_pruning(meta["pruning"]) if "pruning" in meta else None,
        quantization=_quantization(meta["quantization"]) if "quantization" in meta else None,
        gates={str(p): dict(g) for p, g in meta.get("gates", {}).items()},
    )


def load_model_info(path: str | Path, check_vocab: bool = True) -> ModelInfo | DecoderModelInfo:
    """Read and check a runtime model directory; fail with a message naming what is wrong.
    A generation model's directory (task `generate`) comes back as a `DecoderModelInfo`."""
    path = Path(path)
    hint = "convert a checkpoint with `python -m pipeline convert SRC DST`"
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist; {hint}")
    meta_path = path / MODEL_JSON
    if not meta_path.is_file():
        raise ModelDirError(f"{meta_path} is missing: {path} is not a runtime model directory; {hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if is_decoder_meta(meta):  # a generation model: its own layout (engine/decoder_modeldir.py)
            return _load_decoder(path, meta_path, meta)
        version = meta.get("format_version")
        if version not in READABLE_FORMATS:
            raise ModelDirError(
                f"{meta_path} has format_version {version!r}, this version reads {READABLE_FORMATS}; "
                f"re-run the conversion with --force")
        info = _parse(path, _upgrade_v1(meta) if version == 1 else meta)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelDirError(f"{meta_path} is corrupt ({type(e).__name__}: {e}); re-run the conversion with --force") from e
    for f in (info.program_file, info.params_file, info.vocab_file):
        if not f.is_file() or f.stat().st_size == 0:
            raise ModelDirError(f"{f} is missing or empty; re-run the conversion with --force")
    if info.pruning is not None:
        return _check_pruned(info, meta_path, check_vocab)
    if check_vocab:
        n = check_vocab_file(info.vocab_file)
        if n != info.vocab_size:
            raise ModelDirError(
                f"{info.vocab_file} has {n} tokens but the model's embedding table has "
                f"{info.vocab_size} rows: vocab and weights do not belong together"
            )
    return info


def _load_decoder(path: Path, meta_path: Path, meta: dict) -> DecoderModelInfo:
    info = parse_decoder_meta(path, meta)
    for f in required_files(info):
        if not f.is_file() or f.stat().st_size == 0:
            raise ModelDirError(f"{f} is missing or empty; re-run the conversion with --force")
    return info


def load_id_map(path: Path) -> np.ndarray:
    """The id map of a pruned model as int64 (the dtype numpy indexes with fastest)."""
    return np.load(path, allow_pickle=False).astype(np.int64)


def _check_pruned(info: ModelInfo, meta_path: Path, check_vocab: bool) -> ModelInfo:
    """A pruned model keeps the full vocab.txt, so the vocab must match the map (one entry per
    token) and the map must point into the embedding table; the map's checksum must be the one
    recorded when the model was pruned (a map from another pruning would silently change ids)."""
    fix = "prune again with `python -m pipeline prune-vocab SOURCE_MODEL --data ... --out DIR --force`"
    map_file = info.path / info.pruning.map_file
    if not map_file.is_file():
        raise ModelDirError(f"{map_file} is missing: {info.path} is a pruned model and needs its id map; {fix}")
    got_sha, want_sha = sha256_file(map_file), info.pruning.map_sha256
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
        n = check_vocab_file(info.vocab_file)
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


def derived_meta(info: ModelInfo, drop: tuple[str, ...] = ()) -> dict:
    """model.json of `info` as the start of a directory derived from it (pruned, quantised):
    without the checksums `write_model_json` recomputes and without the `drop` records, and in
    the current format."""
    meta = _upgrade_v1(info.meta) if info.meta.get("format_version") == 1 else dict(info.meta)
    meta.pop("mode", None)
    meta["format_version"] = FORMAT_VERSION
    return {k: v for k, v in meta.items() if k not in ("params_sha256", "vocab_sha256", *drop)}


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
