"""Encoder checkpoint -> runtime model directory (the converter is separate from the runtime).

Sources: every layout in `checkpoints.LOADERS` (Hugging Face and PaddleNLP today).

The conversion maps names and layouts onto `model.ErnieScorer`, checks every shape, builds the
model, exports it for Paddle Inference into a temporary directory, runs the exported program
against the dynamic-graph model, and only then moves it into place. It refuses to overwrite an
existing directory without `force`.

`target` picks the attention layout of the exported program (`model.ErnieConfig.fused_qkv`):
`cpu` (default) keeps one fused QKV projection, fastest with oneDNN; `gpu` exports separate
q/k/v projections (slices of the same weights, same outputs), the form Paddle's GPU and TensorRT
multi-head attention fusion passes match, and takes the position ids as a fourth input, which
Paddle's variable-length TensorRT path reads the sequence lengths from. `model.json` records it
as `"attention"` and `architecture.position_ids_input`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.convert.checkpoints import TARGETS, find_loader, read_checkpoint, split_qkv
from pipeline.convert.errors import ConversionError
from pipeline.convert.export import PROGRAM_REVISION, build_model, model_inputs, probe_batch, save_runtime_dir
from pipeline.engine.modeldir import (
    ENCODER_INPUTS,
    FORMAT_VERSION,
    POSITION_IDS,
    ModelDirError,
    ModelInfo,
    load_model_info,
    sha256_file,
)


def _checked_mode(ckpt, src: Path, mode: str | None) -> str:
    """The task to export: `mode`, or 'cross' when the checkpoint has a classifier head, else 'bi'."""
    has_head = "classifier.weight" in ckpt.weights
    mode = mode or ("cross" if has_head else "bi")
    if mode == "cross" and not has_head:
        raise ConversionError(f"{src} has no classifier head, so it cannot score in 'cross' mode; use --mode bi")
    if mode == "cross" and "pooler.dense.weight" not in ckpt.weights:
        raise ConversionError(f"{src} has a classifier but no pooler, which 'cross' mode needs")
    return mode


def _runtime_meta(ckpt, src: Path, name: str | None, mode: str, seq: int, target: str, config: dict) -> dict:
    """model.json of the converted directory (the checksums and program revision are added on save)."""
    import paddle

    return {
        "format_version": FORMAT_VERSION,
        "name": name or ckpt.name,
        "task": mode,
        "inputs": list(ENCODER_INPUTS) + ([POSITION_IDS] if target == "gpu" else []),
        "pooling": "cls" if mode == "cross" else "mean",
        "output": "score" if mode == "cross" else "embedding",
        "max_seq_len": seq,
        "precision": "fp32",
        "attention": TARGETS[target],
        "architecture": config,
        "tokenizer": {"lowercase": ckpt.lowercase, "handle_chinese_chars": True, "strip_accents": None},
        "source": {"path": str(src.resolve()), "layout": ckpt.layout, "file": ckpt.weights_file.name,
                   "sha256": sha256_file(ckpt.weights_file)},
        "converted_by": f"pipeline {__version__}, paddle {paddle.__version__}",
    }


def _export_check(model, vocab_size: int):
    """The check of the staged directory: the exported program, run by the predictor we ship,
    must reproduce the dynamic-graph model."""
    import paddle

    from pipeline.engine.predictor import PaddlePredictor, PredictorSettings

    def check(info: ModelInfo) -> None:
        batch = probe_batch(vocab_size)
        with paddle.no_grad():
            want = model(*model_inputs(model, batch)).numpy()
        got = PaddlePredictor(info, PredictorSettings(threads=1)).run(**batch)
        err = float(np.max(np.abs(got - want)))
        if not err < 1e-4:
            raise ConversionError(f"exported program differs from the model by {err:.3g} (limit 1e-4)")

    return check


def convert(src: str | Path, dst: str | Path, mode: str | None = None, force: bool = False,
            max_seq_len: int | None = None, name: str | None = None, target: str = "cpu") -> Path:
    """Convert checkpoint `src` into runtime directory `dst`; returns `dst`.

    `target` 'cpu' (fused QKV, the fast oneDNN layout) or 'gpu' (separate q/k/v projections,
    which Paddle's GPU/TensorRT multi-head attention fusion needs; see the module doc)."""
    import zlib  # noqa: F401 - must precede paddle 2.6's first import (it breaks zlib otherwise)

    if target not in TARGETS:
        raise ConversionError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and not force:
        raise ConversionError(f"{dst} exists; pass --force to overwrite it")
    ckpt = read_checkpoint(src)
    mode = _checked_mode(ckpt, src, mode)
    seq = max_seq_len or ckpt.max_seq_len
    if not 2 < seq <= ckpt.config["max_position_embeddings"]:
        raise ConversionError(f"max_seq_len {seq} must be in 3..{ckpt.config['max_position_embeddings']}")

    import paddle

    paddle.set_device("cpu")
    config = {**ckpt.config, "fused_qkv": target == "cpu", "position_ids_input": target == "gpu"}
    model = build_model(config, mode, ckpt.weights if target == "cpu" else split_qkv(ckpt.weights))
    meta = _runtime_meta(ckpt, src, name, mode, seq, target, config)
    return save_runtime_dir(model, meta, ckpt.vocab_file, dst, _export_check(model, config["vocab_size"]))


def ensure_converted(src: Path, dst: Path, name: str | None = None) -> Path:
    """Reuse `dst` if it holds a valid conversion of `src`; otherwise (re)convert it.

    This is how the default model gets into the cache on first use.
    """
    try:
        info = load_model_info(dst)
        if info.source_sha256 == sha256_file(src / find_loader(src).weights_name) \
                and info.program_revision >= PROGRAM_REVISION:
            return dst
    except ModelDirError:
        pass
    return convert(src, dst, force=True, name=name)

