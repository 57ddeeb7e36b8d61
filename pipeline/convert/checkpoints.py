"""Checkpoints -> our weight names, through a registry of loaders (layout -> loader), so a new
checkpoint layout is one entry in `LOADERS` (no paddle, except to read PaddleNLP's pickles).

Loaders:
- `hf`: Hugging Face layout: `config.json`, `vocab.txt`, `model.safetensors` (BERT or ERNIE
  names, with or without a `bert.`/`ernie.` prefix, optional `classifier`).
- `paddlenlp`: PaddleNLP layout: `model_config.json` or `config.json`, `model_state.pdparams`,
  `vocab.txt` (ERNIE 1.0/2.0/3.0, task-type embeddings included).

Every tensor is mapped onto `convert.model.ErnieScorer`'s names and its shape checked against
the config; a tensor left over means the checkpoint is not the architecture we think it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.convert.errors import ConversionError
from pipeline.engine.modeldir import VOCAB_FILE, count_vocab


@dataclass
class Checkpoint:
    """A checkpoint read into our naming: numpy weights plus everything model.json records."""

    layout: str  # a key of LOADERS
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


@dataclass(frozen=True)
class Loader:
    """One checkpoint layout: the weights file that identifies it, how to read its config and
    state, and how its tensor names map onto ours."""

    layout: str
    weights_name: str
    read: Callable[[Path], tuple[Path, dict, dict[str, np.ndarray]]]  # src -> (config file, config, state)
    mapper: Callable[[dict, int, Path], dict[str, np.ndarray]]
    default_task_vocab: int  # task-type rows when the config says use_task_id without a size


def _read_hf(src: Path) -> tuple[Path, dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{cfg_path} is missing (Hugging Face layout needs config.json)")
    hf = _read_json(cfg_path)
    if hf.get("model_type") not in ("bert", "ernie", None):
        raise ConversionError(f"{cfg_path}: model_type {hf.get('model_type')!r} is not bert or ernie")
    return cfg_path, hf, dict(load_file(str(src / "model.safetensors")))


def _read_paddlenlp(src: Path) -> tuple[Path, dict, dict[str, np.ndarray]]:
    cfg_path = src / "model_config.json" if (src / "model_config.json").is_file() else src / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{src}: model_config.json or config.json is missing")
    hf = _read_json(cfg_path)
    hf = hf.get("init_args", [hf])[0] if "init_args" in hf else hf  # PaddleNLP 2.0-era configs
    import paddle

    state = paddle.load(str(src / "model_state.pdparams"))
    return cfg_path, hf, {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in state.items()}


# Tried in order: the first whose weights file is present reads the checkpoint.
LOADERS: dict[str, Loader] = {
    "hf": Loader("hf", "model.safetensors", _read_hf, _map_hf, default_task_vocab=0),
    "paddlenlp": Loader("paddlenlp", "model_state.pdparams", _read_paddlenlp, _map_paddlenlp, default_task_vocab=3),
}


def find_loader(src: Path) -> Loader:
    for loader in LOADERS.values():
        if (src / loader.weights_name).is_file():
            return loader
    found = ", ".join(f"{l.weights_name} ({l.layout})" for l in LOADERS.values())
    raise ConversionError(f"{src}: found none of the weights files {found}")


def _encoder_config(hf: dict, cfg_path: Path, task_vocab: int) -> dict:
    try:
        cfg = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
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
    return cfg


def read_checkpoint(src: str | Path) -> Checkpoint:
    """Read a checkpoint folder of any layout in LOADERS into our names, with its config and
    tokenizer facts."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"checkpoint folder {src} does not exist")
    vocab = src / VOCAB_FILE
    if not vocab.is_file():
        raise ConversionError(f"{vocab} is missing: a WordPiece vocab.txt is required")
    loader = find_loader(src)
    cfg_path, hf, state = loader.read(src)
    task_vocab = int(hf.get("task_type_vocab_size", loader.default_task_vocab)) if hf.get("use_task_id") else 0
    cfg = _encoder_config(hf, cfg_path, task_vocab)
    weights_file = src / loader.weights_name
    weights = loader.mapper(state, cfg["num_hidden_layers"], weights_file)
    if "classifier.weight" in weights:
        cfg["num_labels"] = int(weights["classifier.weight"].shape[1])
    ckpt = Checkpoint(
        layout=loader.layout,
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


