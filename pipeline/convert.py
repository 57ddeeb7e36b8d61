"""Checkpoint -> runtime model directory (the converter is separate from the runtime).

Sources:
- Hugging Face layout: `config.json`, `vocab.txt`, `model.safetensors` (BERT or ERNIE names,
  with or without a `bert.`/`ernie.` prefix, optional `classifier`).
- PaddleNLP layout: `model_config.json` or `config.json`, `model_state.pdparams`, `vocab.txt`
  (ERNIE 1.0/2.0/3.0, task-type embeddings included).

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

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import __version__
from pipeline.modeldir import (
    FORMAT_VERSION,
    PROGRAM_FILE,
    VOCAB_FILE,
    ModelDirError,
    ModelInfo,
    count_vocab,
    load_model_info,
    sha256_file,
    staged_dir,
    write_model_json,
)


class ConversionError(Exception):
    """The checkpoint does not fit the ERNIE architecture; the message explains what differs."""


@dataclass
class Checkpoint:
    """A checkpoint read into our naming: numpy weights plus everything model.json records."""

    layout: str  # 'hf' | 'paddlenlp'
    weights_file: Path
    vocab_file: Path
    config: dict  # ErnieConfig fields
    weights: dict[str, np.ndarray]  # names of model.ErnieScorer
    lowercase: bool
    max_seq_len: int
    name: str


# ----------------------------------------------------------------------------- reading sources


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e


def _strip_prefix(state: dict[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Drop a task model's base prefix (`bert.`, `ernie.`) so base and task checkpoints map alike."""
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _take(state: dict, name: str, src: Path) -> np.ndarray:
    if name not in state:
        near = sorted(k for k in state if k.split(".")[-1] == name.split(".")[-1])[:5]
        raise ConversionError(f"{src}: tensor {name!r} is missing (similar names: {near or 'none'})")
    return np.asarray(state.pop(name), dtype=np.float32)


def _map_hf(state: dict[str, np.ndarray], n_layers: int, src: Path) -> dict[str, np.ndarray]:
    """HF BERT/ERNIE names -> ours. HF Linear weights are [out, in]; Paddle's are [in, out]."""
    state = _strip_prefix(state, ("bert.", "ernie."))
    state.pop("embeddings.position_ids", None)  # a buffer, not a weight
    t = lambda name: _take(state, name, src).T  # noqa: E731 - a transpose-on-read shorthand

    def ln(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        if f"{prefix}.weight" in state:
            return _take(state, f"{prefix}.weight", src), _take(state, f"{prefix}.bias", src)
        return _take(state, f"{prefix}.gamma", src), _take(state, f"{prefix}.beta", src)  # old TF names

    out: dict[str, np.ndarray] = {}
    for emb in ("word", "position", "token_type"):
        out[f"embeddings.{emb}_embeddings.weight"] = _take(state, f"embeddings.{emb}_embeddings.weight", src)
    if "embeddings.task_type_embeddings.weight" in state:
        out["embeddings.task_type_embeddings.weight"] = _take(state, "embeddings.task_type_embeddings.weight", src)
    out["embeddings.layer_norm.weight"], out["embeddings.layer_norm.bias"] = ln("embeddings.LayerNorm")
    for i in range(n_layers):
        s, d = f"encoder.layer.{i}", f"encoder.layers.{i}"
        q, k, v = (f"{s}.attention.self.{n}" for n in ("query", "key", "value"))
        out[f"{d}.qkv_proj.weight"] = np.concatenate([t(f"{q}.weight"), t(f"{k}.weight"), t(f"{v}.weight")], axis=1)
        out[f"{d}.qkv_proj.bias"] = np.concatenate([_take(state, f"{n}.bias", src) for n in (q, k, v)])
        out[f"{d}.out_proj.weight"] = t(f"{s}.attention.output.dense.weight")
        out[f"{d}.out_proj.bias"] = _take(state, f"{s}.attention.output.dense.bias", src)
        out[f"{d}.norm1.weight"], out[f"{d}.norm1.bias"] = ln(f"{s}.attention.output.LayerNorm")
        out[f"{d}.linear1.weight"] = t(f"{s}.intermediate.dense.weight")
        out[f"{d}.linear1.bias"] = _take(state, f"{s}.intermediate.dense.bias", src)
        out[f"{d}.linear2.weight"] = t(f"{s}.output.dense.weight")
        out[f"{d}.linear2.bias"] = _take(state, f"{s}.output.dense.bias", src)
        out[f"{d}.norm2.weight"], out[f"{d}.norm2.bias"] = ln(f"{s}.output.LayerNorm")
    if "pooler.dense.weight" in state:
        out["pooler.dense.weight"] = t("pooler.dense.weight")
        out["pooler.dense.bias"] = _take(state, "pooler.dense.bias", src)
    if "classifier.weight" in state:
        out["classifier.weight"] = t("classifier.weight")
        out["classifier.bias"] = _take(state, "classifier.bias", src)
    _refuse_leftovers(state, src)
    return out


def _map_paddlenlp(state: dict[str, np.ndarray], n_layers: int, src: Path) -> dict[str, np.ndarray]:
    """PaddleNLP ERNIE names -> ours: identical except q/k/v, which are concatenated."""
    state = _strip_prefix(state, ("ernie.",))
    out: dict[str, np.ndarray] = {}
    names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             "embeddings.token_type_embeddings.weight", "embeddings.layer_norm.weight", "embeddings.layer_norm.bias"]
    if "embeddings.task_type_embeddings.weight" in state:
        names.append("embeddings.task_type_embeddings.weight")
    for n in names:
        out[n] = _take(state, n, src)
    for i in range(n_layers):
        p = f"encoder.layers.{i}"
        for kind in ("weight", "bias"):
            parts = [_take(state, f"{p}.self_attn.{x}_proj.{kind}", src) for x in "qkv"]
            out[f"{p}.qkv_proj.{kind}"] = np.concatenate(parts, axis=-1)
            out[f"{p}.out_proj.{kind}"] = _take(state, f"{p}.self_attn.out_proj.{kind}", src)
            for sub in ("linear1", "linear2", "norm1", "norm2"):
                out[f"{p}.{sub}.{kind}"] = _take(state, f"{p}.{sub}.{kind}", src)
    for head in ("pooler.dense", "classifier"):
        if f"{head}.weight" in state:
            out[f"{head}.weight"] = _take(state, f"{head}.weight", src)
            out[f"{head}.bias"] = _take(state, f"{head}.bias", src)
    _refuse_leftovers(state, src)
    return out


# --target -> attention layout recorded in model.json ("attention") and ErnieConfig.fused_qkv.
TARGETS = {"cpu": "fused_qkv", "gpu": "separate_qkv"}


def split_qkv(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our fused `qkv_proj` weights -> separate `q_proj`/`k_proj`/`v_proj` (the GPU layout).

    The fused weight is [H, 3H] = [Wq | Wk | Wv] along the output axis (see `_map_hf`), the bias
    [3H] likewise, so each part is one contiguous third: no value changes."""
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        if ".qkv_proj." not in name:
            out[name] = w
            continue
        if w.shape[-1] % 3:
            raise ConversionError(f"{name} has shape {tuple(w.shape)}: its last axis is not 3 x hidden")
        for part, piece in zip("qkv", np.split(w, 3, axis=-1)):
            out[name.replace(".qkv_proj.", f".{part}_proj.")] = np.ascontiguousarray(piece)
    return out


def _refuse_leftovers(state: dict, src: Path) -> None:
    """A tensor we did not map means the checkpoint is not the architecture we think it is."""
    if state:
        extra = sorted(state)
        raise ConversionError(
            f"{src}: {len(extra)} tensors do not belong to the ERNIE/BERT architecture "
            f"(e.g. {extra[:5]}); is this an encoder checkpoint with a sequence-classification head?"
        )


def _max_len(src: Path, max_pos: int) -> int:
    st = src / "sentence_bert_config.json"
    if st.is_file():
        return int(_read_json(st).get("max_seq_length", max_pos))
    return max_pos


def _lowercase(src: Path, default: bool) -> bool:
    tc = src / "tokenizer_config.json"
    if tc.is_file():
        return bool(_read_json(tc).get("do_lower_case", default))
    return default


def read_checkpoint(src: str | Path) -> Checkpoint:
    """Read a HF or PaddleNLP checkpoint folder into our names, with its config and tokenizer facts."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"checkpoint folder {src} does not exist")
    vocab = src / VOCAB_FILE
    if not vocab.is_file():
        raise ConversionError(f"{vocab} is missing: a WordPiece vocab.txt is required")
    if (src / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        cfg_path = src / "config.json"
        if not cfg_path.is_file():
            raise ConversionError(f"{cfg_path} is missing (Hugging Face layout needs config.json)")
        hf = _read_json(cfg_path)
        if hf.get("model_type") not in ("bert", "ernie", None):
            raise ConversionError(f"{cfg_path}: model_type {hf.get('model_type')!r} is not bert or ernie")
        weights_file = src / "model.safetensors"
        state = dict(load_file(str(weights_file)))
        layout, mapper = "hf", _map_hf
        task_vocab = int(hf.get("task_type_vocab_size", 0)) if hf.get("use_task_id") else 0
    elif (src / "model_state.pdparams").is_file():
        cfg_path = src / "model_config.json" if (src / "model_config.json").is_file() else src / "config.json"
        if not cfg_path.is_file():
            raise ConversionError(f"{src}: model_config.json or config.json is missing")
        hf = _read_json(cfg_path)
        hf = hf.get("init_args", [hf])[0] if "init_args" in hf else hf  # PaddleNLP 2.0-era configs
        weights_file = src / "model_state.pdparams"
        import paddle

        state = {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in paddle.load(str(weights_file)).items()}
        layout, mapper = "paddlenlp", _map_paddlenlp
        task_vocab = int(hf.get("task_type_vocab_size", 3)) if hf.get("use_task_id") else 0
    else:
        raise ConversionError(
            f"{src}: found neither model.safetensors (Hugging Face layout) nor model_state.pdparams "
            f"(PaddleNLP layout)"
        )
    try:
        n_layers = int(hf["num_hidden_layers"])
        cfg = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=int(hf["num_attention_heads"]),
            intermediate_size=int(hf["intermediate_size"]),
            hidden_act=str(hf.get("hidden_act", "gelu")),
            max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
            type_vocab_size=int(hf.get("type_vocab_size", 2)),
            task_type_vocab_size=task_vocab,
            task_id=int(hf.get("task_id", 0)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(hf.get("pad_token_id", 0)),
        )
    except KeyError as e:
        raise ConversionError(f"{cfg_path}: field {e.args[0]!r} is missing") from e
    if cfg["hidden_act"] != "gelu":
        raise ConversionError(f"{cfg_path}: hidden_act {cfg['hidden_act']!r} is not supported (only exact 'gelu')")
    weights = mapper(state, n_layers, weights_file)
    if "classifier.weight" in weights:
        cfg["num_labels"] = int(weights["classifier.weight"].shape[1])
    ckpt = Checkpoint(
        layout=layout,
        weights_file=weights_file,
        vocab_file=vocab,
        config=cfg,
        weights=weights,
        lowercase=_lowercase(src, default=True),
        max_seq_len=min(_max_len(src, cfg["max_position_embeddings"]), cfg["max_position_embeddings"]),
        name=str(hf.get("_name_or_path") or src.name),
    )
    _check_shapes(ckpt)
    return ckpt


def _check_shapes(ckpt: Checkpoint) -> None:
    c = ckpt.config
    h, f = c["hidden_size"], c["intermediate_size"]
    expect = {
        "embeddings.word_embeddings.weight": (c["vocab_size"], h),
        "embeddings.position_embeddings.weight": (c["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": (c["type_vocab_size"], h),
        "embeddings.layer_norm.weight": (h,),
        "embeddings.layer_norm.bias": (h,),
    }
    if c["task_type_vocab_size"]:
        expect["embeddings.task_type_embeddings.weight"] = (c["task_type_vocab_size"], h)
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layers.{i}"
        expect |= {
            f"{p}.qkv_proj.weight": (h, 3 * h), f"{p}.qkv_proj.bias": (3 * h,),
            f"{p}.out_proj.weight": (h, h), f"{p}.out_proj.bias": (h,),
            f"{p}.norm1.weight": (h,), f"{p}.norm1.bias": (h,),
            f"{p}.linear1.weight": (h, f), f"{p}.linear1.bias": (f,),
            f"{p}.linear2.weight": (f, h), f"{p}.linear2.bias": (h,),
            f"{p}.norm2.weight": (h,), f"{p}.norm2.bias": (h,),
        }
    for name, shape in expect.items():
        got = ckpt.weights[name].shape
        if tuple(got) != shape:
            raise ConversionError(
                f"{ckpt.weights_file}: {name} has shape {tuple(got)}, the config "
                f"({ckpt.config}) implies {shape}"
            )
    n_vocab = count_vocab(ckpt.vocab_file)
    if n_vocab != c["vocab_size"]:
        raise ConversionError(
            f"{ckpt.vocab_file} has {n_vocab} tokens but the embedding table has {c['vocab_size']} rows"
        )


# ----------------------------------------------------------------------------- building and export


def build_model(config: dict, mode: str, weights: dict[str, np.ndarray]):
    """An ErnieScorer in eval mode carrying `weights` (only the ones its mode uses)."""
    import paddle

    from pipeline.model import ErnieConfig, ErnieScorer

    model = ErnieScorer(ErnieConfig.from_dict(config), mode)
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(weights))
    if missing:
        raise ConversionError(f"mode {mode!r} needs tensors the checkpoint lacks: {missing[:5]}")
    model.set_state_dict({k: paddle.to_tensor(weights[k]) for k in wanted})
    model.eval()
    return model


def probe_batch(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A small padded batch with varied lengths, used to check an export against its source."""
    rng = np.random.default_rng(seed)
    lengths = np.array([7, 3, 12, 1])
    ids = np.zeros((4, 12), dtype=np.int64)
    types = np.zeros((4, 12), dtype=np.int64)
    mask = np.zeros((4, 12), dtype=np.float32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, vocab_size, n)
        types[i, n // 2:n] = 1
        mask[i, :n] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


# Bumped when the exported program changes in a way that makes older exports slower (not wrong):
# the cached default model is re-exported when its revision is older.
# 2: transpose2 ops carry their XShape output (see `add_transpose_xshape`).
PROGRAM_REVISION = 2


def model_inputs(model, batch: dict[str, np.ndarray]) -> list:
    """The dynamic-graph model's inputs for a padded numpy batch, position ids added when the
    model takes them (the `--target gpu` export)."""
    import paddle

    from pipeline.batching import position_ids

    arrays = [batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")]
    if model.cfg.position_ids_input:
        arrays.append(position_ids(batch["attention_mask"]))
    return [paddle.to_tensor(a) for a in arrays]


def export_model(model, out_dir: Path) -> None:
    import paddle

    from pipeline.model import input_specs

    static = paddle.jit.to_static(model, input_spec=input_specs(model.cfg.position_ids_input), full_graph=True)
    paddle.jit.save(static, str(out_dir / "inference"))
    add_transpose_xshape(out_dir / PROGRAM_FILE)


def add_transpose_xshape(program_file: Path) -> int:
    """Give every transpose2 op of a saved program the XShape output it lacks; returns how many.

    Paddle 2.6's dygraph-to-static export writes transpose2 without XShape, and oneDNN's
    matmul_transpose_reshape fuse pass only matches a transpose2 that has one, so the attention
    output's transpose + reshape (one pair per layer) stayed separate ops that copy the whole
    [B, S, H] activation. XShape is a shape-only output (no data is computed for it); with it the
    pass folds both into the preceding matmul (measured: 111 -> 99 ops on the default model,
    about 2% faster, identical outputs)."""
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc.FromString(program_file.read_bytes())
    added = 0
    for block in desc.blocks:
        var_of = {v.name: v for v in block.vars}
        for op in block.ops:
            if op.type != "transpose2" or any(o.parameter == "XShape" for o in op.outputs):
                continue
            x = next(i for i in op.inputs if i.parameter == "X").arguments[0]
            out = next(o for o in op.outputs if o.parameter == "Out").arguments[0]
            xshape = block.vars.add()
            xshape.CopyFrom(var_of[x])
            xshape.name, xshape.persistable = f"{out}.xshape", False
            dims = list(var_of[x].type.lod_tensor.tensor.dims)
            del xshape.type.lod_tensor.tensor.dims[:]
            xshape.type.lod_tensor.tensor.dims.extend([0] + dims)  # Paddle's XShape convention
            slot = op.outputs.add()
            slot.parameter = "XShape"
            slot.arguments.append(xshape.name)
            added += 1
    program_file.write_bytes(desc.SerializeToString())
    return added


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
    has_head = "classifier.weight" in ckpt.weights
    mode = mode or ("cross" if has_head else "bi")
    if mode == "cross" and not has_head:
        raise ConversionError(f"{src} has no classifier head, so it cannot score in 'cross' mode; use --mode bi")
    if mode == "cross" and "pooler.dense.weight" not in ckpt.weights:
        raise ConversionError(f"{src} has a classifier but no pooler, which 'cross' mode needs")
    seq = max_seq_len or ckpt.max_seq_len
    if not 2 < seq <= ckpt.config["max_position_embeddings"]:
        raise ConversionError(f"max_seq_len {seq} must be in 3..{ckpt.config['max_position_embeddings']}")

    import paddle

    from pipeline.predictor import PaddlePredictor, PredictorSettings

    paddle.set_device("cpu")
    config = {**ckpt.config, "fused_qkv": target == "cpu", "position_ids_input": target == "gpu"}
    model = build_model(config, mode, ckpt.weights if target == "cpu" else split_qkv(ckpt.weights))
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name or ckpt.name,
        "mode": mode,
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

    def check(info: ModelInfo) -> None:
        # The exported program, run by the predictor we ship, must reproduce the dynamic-graph model.
        batch = probe_batch(config["vocab_size"])
        with paddle.no_grad():
            want = model(*model_inputs(model, batch)).numpy()
        got = PaddlePredictor(info, PredictorSettings(threads=1)).run(**batch)
        err = float(np.max(np.abs(got - want)))
        if not err < 1e-4:
            raise ConversionError(f"exported program differs from the model by {err:.3g} (limit 1e-4)")

    return save_runtime_dir(model, meta, ckpt.vocab_file, dst, check)


def save_runtime_dir(model, meta: dict, vocab_file: Path, dst: Path, check: Callable[[ModelInfo], None],
                     extra_files: dict[str, bytes] | None = None) -> Path:
    """Export `model` with `vocab_file`, `extra_files` and `meta` (plus the params and vocab
    checksums) into a temporary directory beside `dst`, run `check` on it, and only then move it
    into place, replacing `dst` (callers refuse an existing `dst` without --force beforehand).
    A failed export or check leaves nothing behind, so a directory that exists is complete."""
    with staged_dir(dst) as stage:
        export_model(model, stage.path)
        shutil.copyfile(vocab_file, stage.path / VOCAB_FILE)
        for fname, data in (extra_files or {}).items():
            (stage.path / fname).write_bytes(data)
        write_model_json(stage.path, {**meta, "program_revision": PROGRAM_REVISION})
        check(load_model_info(stage.path))
    return dst


def ensure_converted(src: Path, dst: Path, name: str | None = None) -> Path:
    """Reuse `dst` if it holds a valid conversion of `src`; otherwise (re)convert it.

    This is how the default model gets into the cache on first use.
    """
    try:
        info = load_model_info(dst)
        if info.source_sha256 == sha256_file(src / "model.safetensors" if (src / "model.safetensors").is_file()
                                             else src / "model_state.pdparams") \
                and info.raw.get("program_revision", 1) >= PROGRAM_REVISION:
            return dst
    except ModelDirError:
        pass
    return convert(src, dst, force=True, name=name)
