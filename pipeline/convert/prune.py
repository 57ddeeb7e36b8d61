"""Vocabulary (embedding-layer) pruning: a runtime model whose word-embedding table keeps only the
rows some data needs, with results proven unchanged on that data.

Why it works without changing a single score: a token's embedding row is the only part of the
model that depends on which token it is. If every id the data produces still finds its own row,
the pruned model computes exactly what the full model computes. So:

1. The data is tokenized with the model's full tokenizer, whole texts without truncation (so the
   kept set covers any `--max-seq-len` a later run uses); pre-tokenized ids are taken as they
   are. The special tokens are always kept, and optionally the first N ids of vocab.txt (WordPiece
   vocabularies are roughly frequency-ordered; there are no corpus counts to go by).
2. The kept ids, in ascending order, become the rows of the new table; `id_map.npy` maps every
   id of the full vocab to its row, and every id not kept to the row of [UNK].
3. Tokenization itself does not change: the pruned directory keeps the full vocab.txt, because
   WordPiece on a shrunken vocab would split unseen words differently (into other pieces, not
   into [UNK]). The runner maps ids through the table after tokenizing, and counts the tokens
   that fell to [UNK] because they were not kept (report.json `tokens.unknown_tokens`).

The pruned model is rebuilt from the source runtime directory's own exported parameters (the
converted checkpoint is not needed), re-exported, and checked twice before it becomes visible:
the dynamic-graph pruned model and then the exported program, each against the full model's
predictor on a probe batch whose ids are all kept. paddle is imported only inside the functions
that need it.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline import __version__
from pipeline.convert.errors import ConversionError
from pipeline.convert.export import build_model, model_inputs, probe_batch, save_runtime_dir
from pipeline.engine.modeldir import (
    ID_MAP_FILE,
    derived_meta,
    PARAMS_FILE,
    ModelInfo,
    load_model_info,
    sha256_file,
)
from pipeline.io.reader import ColumnMap, DatasetReader, list_input_files
from pipeline.engine.tokenizer import WordPieceTokenizer, read_vocab

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
# Pruning reads whole texts: a bound no text reaches, so `token_ids` never truncates.
_NO_LIMIT = 1 << 40
# The pruned program must reproduce the full one on kept ids: the same rows, the same kernels.
EXPORT_TOLERANCE = 1e-6


def count_data_ids(info: ModelInfo, files: Sequence[str | Path], columns: ColumnMap = ColumnMap(),
                   chunk_rows: int = 4096) -> tuple[np.ndarray, int]:
    """How often each full-vocab id occurs in the accepted rows of `files`, and the row count.

    Texts are tokenized whole with the model's full tokenizer (each distinct text of a chunk once:
    the kept set, not the counts, is what matters). Ids of pre-tokenized rows outside the vocab
    are ignored here; the run rejects those rows."""
    tok = WordPieceTokenizer(info.vocab_file, info.tokenizer)
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    reader = DatasetReader(files, columns, chunk_rows=chunk_rows)
    rows = 0
    for chunk, _rejects in reader.chunks():
        if chunk is None:
            continue
        rows += len(chunk)
        if chunk.input_ids is not None:
            seqs = chunk.input_ids
        else:
            seqs = tok.token_ids(list(dict.fromkeys(chunk.query + chunk.doc)), _NO_LIMIT)
        flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64)
        counts += np.bincount(flat[flat < tok.vocab_size], minlength=tok.vocab_size)
    return counts, rows


def choose_kept_ids(counts: np.ndarray, vocab: dict[str, int], keep_top: int = 0) -> np.ndarray:
    """The ids to keep, ascending: those seen in the data, the special tokens, the first `keep_top`."""
    keep = counts > 0
    keep[: max(0, keep_top)] = True
    for t in SPECIAL_TOKENS:
        if t in vocab:
            keep[vocab[t]] = True
    return np.flatnonzero(keep)


def build_id_map(kept: np.ndarray, vocab_size: int, unk_id: int) -> np.ndarray:
    """int32 [vocab_size]: full id -> row of the pruned table; ids not kept -> the [UNK] row."""
    rows = np.full(vocab_size, -1, dtype=np.int64)
    rows[kept] = np.arange(len(kept))
    assert rows[unk_id] >= 0, "[UNK] must be kept"
    rows[rows < 0] = rows[unk_id]
    return rows.astype(np.int32)


def read_runtime_weights(info: ModelInfo) -> dict[str, np.ndarray]:
    """The exported parameters of a runtime directory, under `model.ErnieScorer` names.

    The program names parameters by creation counters (`linear_12.w_0`: they depend on what else
    the converting process built), so the names are translated with the structured names that
    `paddle.jit.save` records in `inference.pdiparams.info` (a pickle, read as `paddle.jit.load`
    itself reads it). Values come from the public static-graph loader, which keeps the saved
    names (`paddle.jit.load` renames parameters that clash with ones already in the process)."""
    import paddle

    info_file = info.path / (PARAMS_FILE + ".info")
    if not info_file.is_file():
        raise ConversionError(f"{info_file} is missing (it names the exported parameters); convert the "
                              f"checkpoint again with `python -m pipeline convert SRC {info.path} --force`")
    with open(info_file, "rb") as f:
        structured = {var: d["structured_name"] for var, d in pickle.load(f).items()}
    paddle.enable_static()
    try:
        scope = paddle.static.Scope()
        with paddle.static.scope_guard(scope):
            program, _, _ = paddle.static.load_inference_model(
                str(info.path / "inference"), paddle.static.Executor(paddle.CPUPlace()))
            saved = {v.name: np.array(scope.find_var(v.name).get_tensor())
                     for v in program.list_vars() if v.persistable and v.name not in ("feed", "fetch")}
    finally:
        paddle.disable_static()
    unnamed = sorted(set(saved) - set(structured))
    if unnamed:
        raise ConversionError(f"{info_file} does not name the exported parameters {unnamed[:5]}")
    return {structured[k]: v for k, v in saved.items()}


def _predict(info: ModelInfo, batch: dict[str, np.ndarray]) -> np.ndarray:
    from pipeline.engine.predictor import PaddlePredictor, PredictorSettings

    return PaddlePredictor(info, PredictorSettings(threads=1)).run(**batch)


def _check_target(model_dir: Path, out: Path, force: bool, keep_top: int) -> None:
    """Refuse an `out` that exists (without `force`) or is the source itself, and a negative `keep_top`."""
    if out.exists() and not force:
        raise ConversionError(f"{out} exists; pass --force to overwrite it")
    if out.resolve() == model_dir.resolve():
        raise ConversionError(f"--out {out} is the source model itself; choose another directory")
    if keep_top < 0:
        raise ConversionError(f"--keep-top must be >= 0, got {keep_top}")


def _load_unpruned(model_dir: Path) -> ModelInfo:
    """The source runtime model; a pruned one is refused (its source is pruned instead)."""
    info = load_model_info(model_dir)
    if info.id_map_file is not None:
        raise ConversionError(f"{model_dir} is already pruned; prune its source model "
                              f"({info.pruning.source_path}) on all the data instead")
    return info


def _read_full_vocab(info: ModelInfo) -> dict[str, int]:
    """The source model's full vocab, which must hold the special tokens the id map relies on."""
    vocab = read_vocab(info.vocab_file)
    missing = [t for t in ("[UNK]", "[PAD]", "[CLS]", "[SEP]") if t not in vocab]
    if missing:
        raise ConversionError(f"{info.vocab_file} lacks the special tokens {missing}")
    return vocab


def _npy_bytes(a: np.ndarray) -> bytes:
    """`a` as the bytes of a .npy file (written as the id map, and checksummed in model.json)."""
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _rebuild_pruned(info: ModelInfo, kept: np.ndarray, id_map: np.ndarray):
    """(the dynamic-graph pruned model, its architecture): the source's exported parameters with
    the word-embedding table cut to the `kept` rows."""
    weights = read_runtime_weights(info)
    weights[WORD_EMBEDDINGS] = np.ascontiguousarray(weights[WORD_EMBEDDINGS][kept])
    arch = info.architecture
    config = {**arch, "vocab_size": int(len(kept)),
              "pad_token_id": int(id_map[int(arch.get("pad_token_id", 0))])}
    model = build_model(config, info.task, weights)  # refuses missing parameters
    extra = sorted(set(weights) - set(model.state_dict()))
    if extra:
        raise ConversionError(f"{info.params_file} holds parameters the scorer does not have: {extra[:5]}")
    return model, config


def _check_rebuilt(model, probe: dict[str, np.ndarray], want: np.ndarray, model_dir: Path) -> None:
    """Check 1: the dynamic-graph pruned model reproduces the full model's program on kept ids."""
    import paddle

    with paddle.no_grad():
        got = model(*model_inputs(model, probe))
    err = float(np.max(np.abs(got.numpy() - want)))
    if not err < 1e-4:  # dynamic graph vs exported program, the converter's limit
        raise ConversionError(f"the rebuilt pruned model differs from {model_dir} by {err:.3g} on kept ids "
                              f"(limit 1e-4): the parameters were not read back correctly")


def _exported_check(probe: dict[str, np.ndarray], want: np.ndarray, model_dir: Path):
    """Check 2, run on the staged directory: the exported pruned program reproduces the full one."""
    def check(pruned: ModelInfo) -> None:
        err = float(np.max(np.abs(_predict(pruned, probe) - want)))
        if not err <= EXPORT_TOLERANCE:
            raise ConversionError(f"the exported pruned program differs from {model_dir} by {err:.3g} on kept "
                                  f"ids (limit {EXPORT_TOLERANCE:g})")

    return check


def _pruning_record(info: ModelInfo, vocab: dict[str, int], kept: np.ndarray, id_map: np.ndarray,
                    map_bytes: bytes, keep_top: int, files: Sequence[Path], rows: int) -> dict:
    """model.json "pruning" of the pruned copy of `info` (read back as `modeldir.Pruning`)."""
    import paddle

    return {
        "source_path": str(info.path.resolve()),
        "source_params_sha256": sha256_file(info.params_file),
        "source_vocab_size": len(vocab),
        "ids_kept": int(len(kept)),
        "keep_top": keep_top,
        "data": [{"file": str(f.resolve()), "sha256": sha256_file(f)} for f in files],
        "data_rows": rows,
        "map_file": ID_MAP_FILE,
        "map_sha256": hashlib.sha256(map_bytes).hexdigest(),
        "unk_row": int(id_map[vocab["[UNK]"]]),
        "pruned_by": f"pipeline {__version__}, paddle {paddle.__version__}",
    }


def prune_vocab(model_dir: str | Path, data: Sequence[str | Path], out: str | Path, keep_top: int = 0,
                force: bool = False, columns: ColumnMap = ColumnMap(), name: str | None = None) -> Path:
    """Write the pruned copy of runtime model `model_dir` for the data in `data` into `out`."""
    import zlib  # noqa: F401 - must precede paddle 2.6's first import (it breaks zlib otherwise)

    model_dir, out = Path(model_dir), Path(out)
    _check_target(model_dir, out, force, keep_top)
    info = _load_unpruned(model_dir)
    files = list_input_files(data)
    vocab = _read_full_vocab(info)
    counts, rows = count_data_ids(info, files, columns)
    if rows == 0:
        raise ConversionError(f"no usable rows in {[str(f) for f in files]}: nothing to prune for")
    kept = choose_kept_ids(counts, vocab, keep_top)
    id_map = build_id_map(kept, len(vocab), vocab["[UNK]"])
    map_bytes = _npy_bytes(id_map)

    import paddle

    paddle.set_device("cpu")
    # The reference: the full model's own exported program on a probe whose ids are all kept.
    pruned_probe = probe_batch(len(kept))
    want = _predict(info, {**pruned_probe, "input_ids": kept[pruned_probe["input_ids"]]})
    model, config = _rebuild_pruned(info, kept, id_map)
    _check_rebuilt(model, pruned_probe, want, model_dir)

    meta = derived_meta(info, drop=("pruning",))
    meta["name"] = name or f"{info.name}-pruned"
    meta["architecture"] = config
    meta["pruning"] = _pruning_record(info, vocab, kept, id_map, map_bytes, keep_top, files, rows)
    return save_runtime_dir(model, meta, info.vocab_file, out, _exported_check(pruned_probe, want, model_dir),
                            extra_files={ID_MAP_FILE: map_bytes})
