"""A Hugging Face decoder directory (`llama`, `ernie4_5`) -> `DecoderCheckpoint`.

The directory is what `save_pretrained` writes: `config.json`, `model.safetensors` (or shards
named by `model.safetensors.index.json`), `generation_config.json`, `tokenizer.json`,
`tokenizer_config.json` (or `chat_template.jinja`).

What the two model types mean, read from transformers 4.57's `modeling_llama.py` and
`modeling_ernie4_5.py` / `configuration_ernie4_5.py`:
- the same block and the same weight names (`model.embed_tokens`,
  `model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`,
  `model.layers.N.{input,post_attention}_layernorm`, `model.norm`, `lm_head`), torch Linear
  weights [out, in], transposed here to Paddle's [in, out];
- RoPE: Llama rotates the two halves of each head (`rotate_half` = cat(-x2, x1)); ERNIE 4.5's
  `rotate_half` rotates adjacent pairs (stack(-x[1::2], x[0::2])) and its `apply_rotary_pos_emb`
  repeats each frequency twice (`cos[..., :D/2].repeat_interleave(2)`), so pair (x[2i], x[2i+1])
  turns by position * theta^(-2i/D): GPT-J style, our `rope_interleaved=True`, on the weights as
  stored (no row permutation);
- biases: Llama's `attention_bias` is on q, k, v and o, `mlp_bias` on gate/up/down; ERNIE 4.5's
  one `use_bias` is on all seven projections;
- `head_dim`: Llama's defaults to hidden_size / num_attention_heads, ERNIE 4.5's to 128;
- tied head: `tie_word_embeddings` (Llama default False, ERNIE 4.5 default True); a tied
  checkpoint's `lm_head.weight`, when stored, is ignored, as transformers ties it to the
  embedding.
Keys a config leaves out take the defaults of transformers' config class (`_DEFAULTS`), except
the five sizes (`_REQUIRED`), which must be there. What
decoder.py does not compute (rope scaling, mixture of experts, sliding windows, another
activation, partial rotary, soft-capping, quantized weights) is refused, naming the file and key.

Weights are read with `safetensors.numpy`; bf16 (numpy has no such dtype) is widened to float32
from the raw bytes. Everything ends up float32.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.convert.decoder_checkpoint import DecoderCheckpoint
from pipeline.convert.errors import ConversionError

# transformers' config-class defaults (LlamaConfig, Ernie4_5Config), for the keys we read.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                  rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None,
                  attention_bias=False, mlp_bias=False, head_dim=None),
    "ernie4_5": dict(num_key_value_heads=2, hidden_act="silu", max_position_embeddings=131072,
                     rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=None,
                     use_bias=False, head_dim=128),
}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

# Keys whose non-trivial values change the computation in ways decoder.py does not implement.
# key -> the values that are harmless.
_REFUSED: dict[str, tuple] = {
    "rope_scaling": (None, {}, {"rope_type": "default"}, {"type": "default"}),
    "partial_rotary_factor": (None, 1, 1.0),
    "compression_ratio": (None, 1, 1.0),  # ERNIE 4.5's remote-code position compression
    "sliding_window": (None,),
    "use_sliding_window": (None, False),
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "quantization_config": (None,),
    "num_experts": (None, 0, 1),
    "num_local_experts": (None, 0, 1),
    "n_routed_experts": (None, 0),
    "moe_num_experts": (None, 0, [], 1),
    "moe_layer_start_index": (None,),
    "moe_intermediate_size": (None, 0, []),
    "use_moe": (None, False),
}

_WEIGHT_FILE, _INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Buffers some older checkpoints store; transformers recomputes them and so do we.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _load_json(path: Path, required: bool = True) -> Optional[dict]:
    if not path.is_file():
        if required:
            raise ConversionError(f"{path}: no such file")
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return d


# ----------------------------------------------------------------------------- config


def read_config(path: Path, raw: dict):
    """config.json (`path`, parsed as `raw`) -> (DecoderConfig, model_type)."""
    from pipeline.convert.decoder import DecoderConfig

    model_type = raw.get("model_type")
    if model_type not in _DEFAULTS:
        raise ConversionError(f"{path}: model_type {model_type!r} is not supported "
                              f"(only {', '.join(_DEFAULTS)})")
    for key in _REQUIRED:
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool) or raw[key] <= 0:
            raise ConversionError(f"{path}: {key} is missing or not a positive integer ({raw.get(key)!r})")
    for key, harmless in _REFUSED.items():
        if key in raw and raw[key] not in harmless:
            raise ConversionError(f"{path}: {key} = {json.dumps(raw[key])} is not supported "
                                  f"(the decoder computes plain RoPE, dense, full attention, float weights)")
    layer_types = raw.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ConversionError(f"{path}: layer_types {sorted(set(layer_types))} is not supported (full attention only)")
    # As the config class: a key left out takes its default; an explicit null head_dim or
    # num_key_value_heads means hidden_size / heads and num_attention_heads (so ERNIE 4.5's
    # missing head_dim is 128, its null head_dim hidden_size / num_attention_heads).
    c = {**_DEFAULTS[model_type], **raw}
    if c["hidden_act"] not in ("silu", "swish"):
        raise ConversionError(f"{path}: hidden_act {c['hidden_act']!r} is not supported (SwiGLU with silu only)")

    heads = c["num_attention_heads"]
    kv = c["num_key_value_heads"] if c["num_key_value_heads"] is not None else heads
    if heads % kv:
        raise ConversionError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    head_dim = c["head_dim"]
    if head_dim is None:
        if c["hidden_size"] % heads:
            raise ConversionError(f"{path}: hidden_size {c['hidden_size']} is not a multiple of "
                                  f"num_attention_heads {heads} and there is no head_dim")
        head_dim = c["hidden_size"] // heads
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ConversionError(f"{path}: head_dim {head_dim!r} is not a positive even integer (RoPE pairs)")
    if model_type == "ernie4_5":
        attn_bias = out_bias = mlp_bias = bool(c["use_bias"])
    else:
        attn_bias = out_bias = bool(c["attention_bias"])
        mlp_bias = bool(c["mlp_bias"])
    ids = {k: _first_id(path, k, c.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    for key in ("rms_norm_eps", "rope_theta", "max_position_embeddings"):
        if isinstance(c[key], bool) or not isinstance(c[key], (int, float)) or c[key] <= 0:
            raise ConversionError(f"{path}: {key} {c[key]!r} is not a positive number")
    cfg = DecoderConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=c["intermediate_size"],
        rms_norm_eps=float(c["rms_norm_eps"]),
        rope_theta=float(c["rope_theta"]),
        rope_interleaved=model_type == "ernie4_5",
        max_position_embeddings=int(c["max_position_embeddings"]),
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        attention_bias=attn_bias,
        attention_out_bias=out_bias,
        mlp_bias=mlp_bias,
        head_dim=None if head_dim * heads == c["hidden_size"] else head_dim,
        model_type=model_type,
        **ids,
    )
    return cfg, model_type


def _ids(path: Path, key: str, v) -> tuple[int, ...]:
    """A token id field: an int, a list of ints, or absent (None)."""
    if v is None:
        return ()
    vs = v if isinstance(v, list) else [v]
    if not vs or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vs):
        raise ConversionError(f"{path}: {key} {v!r} is not a token id or a list of them")
    return tuple(dict.fromkeys(vs))


def _first_id(path: Path, key: str, v) -> Optional[int]:
    ids = _ids(path, key, v)
    return ids[0] if ids else None


# ----------------------------------------------------------------------------- weights


def weight_files(src: Path) -> tuple[list[Path], Optional[dict[str, str]]]:
    """The safetensors files, and the index's tensor -> file map when sharded."""
    index = src / _INDEX_FILE
    if (src / _WEIGHT_FILE).is_file():
        return [src / _WEIGHT_FILE], None
    raw = _load_json(index)
    wmap = raw.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise ConversionError(f"{index}: no weight_map")
    files = []
    for name in dict.fromkeys(wmap.values()):
        f = src / name
        if Path(name).name != name or not f.is_file():
            raise ConversionError(f"{index}: shard {name!r} is missing")
        files.append(f)
    return files, wmap


def _header(path: Path) -> dict[str, dict]:
    """A safetensors file's tensor table: name -> {dtype, shape, data_offsets}."""
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100 << 20:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file: {e}") from e
    header.pop("__metadata__", None)
    return header


def _hf_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The tensors transformers' model has for this config, HF names, torch layout."""
    from pipeline.convert.gguf_checkpoint import expected_shapes

    out = {}
    for name, shape in expected_shapes(cfg).items():
        hf = name if name == "lm_head.weight" else "model." + name
        out[hf] = tuple(reversed(shape)) if len(shape) == 2 and name != "embed_tokens.weight" else tuple(shape)
    return out


def _our_name(hf: str) -> str:
    return hf if hf == "lm_head.weight" else hf[len("model."):]


def _read_tensor(path: Path, handle, name: str, info: dict, data_start: int) -> np.ndarray:
    dtype = info["dtype"]
    if dtype == "BF16":  # the top half of a float32: widen exactly
        a, b = info["data_offsets"]
        raw = np.fromfile(path, dtype="<u2", count=(b - a) // 2, offset=data_start + a)
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    if dtype not in ("F32", "F16", "F64"):
        raise ConversionError(f"{path}: {name} is stored as {dtype}; only float tensors (F32, F16, BF16, F64)")
    return np.asarray(handle.get_tensor(name), dtype=np.float32)


def read_weights(src: Path, cfg, with_weights: bool = True):
    """Names and shapes checked against the config; fp32 weights in our names and [in, out]."""
    from safetensors import safe_open

    files, wmap = weight_files(src)
    want = _hf_shapes(cfg)
    where: dict[str, tuple[Path, dict]] = {}
    dtypes: dict[str, int] = {}
    for f in files:
        for name, info in _header(f).items():
            if name in where:
                raise ConversionError(f"{f}: tensor {name} is also in {where[name][0].name}")
            where[name] = (f, info)
    for name in list(where):
        if _IGNORED.fullmatch(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            del where[name]
    names = ", ".join(p.name for p in files)
    missing = sorted(set(want) - set(where))
    extra = sorted(set(where) - set(want))
    if missing:
        raise ConversionError(f"{src / names}: missing tensor(s) {missing[:5]} that config.json implies")
    if extra:
        raise ConversionError(f"{where[extra[0]][0]}: unexpected tensor(s) {extra[:5]} for this config.json")
    for name, shape in want.items():
        f, info = where[name]
        if tuple(info["shape"]) != shape:
            raise ConversionError(f"{f}: {name} has shape {tuple(info['shape'])}, config.json implies {shape}")
        dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + 1
    if not with_weights:
        return {}, dtypes
    weights: dict[str, np.ndarray] = {}
    for f in files:
        data_start = _data_start(f)
        with safe_open(str(f), framework="np") as handle:
            for name, (g, info) in where.items():
                if g != f:
                    continue
                w = _read_tensor(f, handle, name, info, data_start)
                if w.ndim == 2 and name != "model.embed_tokens.weight":
                    w = w.T  # torch Linear [out, in] -> Paddle [in, out]
                weights[_our_name(name)] = np.ascontiguousarray(w, dtype=np.float32)
    return weights, dtypes


def _data_start(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


# ----------------------------------------------------------------------------- tokenizer


def _token_id(tokenizer, tok) -> Optional[int]:
    """A tokenizer_config.json token entry (a string or an AddedToken dict) -> its id."""
    if isinstance(tok, dict):
        tok = tok.get("content")
    if not isinstance(tok, str):
        return None
    return tokenizer.token_to_id(tok)


def _chat_template(src: Path, tok_cfg: dict) -> Optional[str]:
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    if isinstance(t, str):
        return t
    jinja = src / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def read_tokenizer(src: Path):
    from tokenizers import Tokenizer

    path = src / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"{path}: no such file (a Hugging Face fast tokenizer is needed; "
                              f"a sentencepiece tokenizer.model alone is not supported)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception subclass
        raise ConversionError(f"{path}: not a readable tokenizer: {e}") from e


# ----------------------------------------------------------------------------- entry point


def read_hf_decoder(path: Path | str, with_weights: bool = True) -> DecoderCheckpoint:
    """Read a Hugging Face `llama` / `ernie4_5` causal-LM directory."""
    src = Path(path)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    cfg_path = src / "config.json"
    raw = _load_json(cfg_path)
    cfg, model_type = read_config(cfg_path, raw)
    gen_path = src / "generation_config.json"
    gen = _load_json(gen_path, required=False) or {}
    tok_cfg = _load_json(src / "tokenizer_config.json", required=False) or {}
    tokenizer = read_tokenizer(src)
    n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    if n_tokens > cfg.vocab_size:
        raise ConversionError(f"{src / 'tokenizer.json'}: {n_tokens} tokens, but config.json has "
                              f"vocab_size {cfg.vocab_size} embedding rows")
    weights, dtypes = read_weights(src, cfg, with_weights)

    # generation_config.json (what generate() uses) over config.json over tokenizer_config.json.
    special: dict[str, Optional[int]] = {}
    eos_ids: tuple[int, ...] = ()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = _ids(gen_path, key, gen.get(key)) or _ids(cfg_path, key, raw.get(key))
        if not ids:
            one = _token_id(tokenizer, tok_cfg.get(key.replace("_id", "")))
            ids = () if one is None else (one,)
        special[key] = ids[0] if ids else None
        if key == "eos_token_id":
            eos_ids = ids
    special["unk_token_id"] = _token_id(tokenizer, tok_cfg.get("unk_token"))
    for key, v in special.items():
        if v is not None and v >= cfg.vocab_size:
            raise ConversionError(f"{src}: {key} {v} is outside the vocabulary ({cfg.vocab_size})")

    files, _ = weight_files(src)
    sources = [cfg_path] + [p for p in (gen_path, src / "tokenizer.json", src / "tokenizer_config.json",
                                        src / "chat_template.jinja") if p.is_file()]
    if (src / _INDEX_FILE).is_file() and files != [src / _WEIGHT_FILE]:
        sources.append(src / _INDEX_FILE)
    return DecoderCheckpoint(
        path=src,
        name=src.name,
        config=cfg,
        weights=weights,
        tokenizer=tokenizer,
        special_tokens=special,
        add_bos_token=bool(tok_cfg.get("add_bos_token", False)),
        add_eos_token=bool(tok_cfg.get("add_eos_token", False)),
        chat_template=_chat_template(src, tok_cfg),
        quant_types=dtypes,
        architecture=model_type,
        source_files=sources + files,
        eos_token_ids=eos_ids,
    )
