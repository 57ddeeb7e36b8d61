"""A Llama-family decoder exported onto Paddle 2.6.2's fused decoder op, `fused_multi_transformer`,
for fp16 generation on a GPU (`convert --target gpu`). Written to Paddle's API; NOT RUN here: the
CPU build of Paddle has no such op (see README "GPU generation").

What Paddle 2.6.2's op can do, read from the op maker in the paddlepaddle-gpu 2.6.2 wheel's
libpaddle.so (its attribute strings; the CPU wheel does not register the op at all):
inputs X, LnScale, LnBias, QKVW, QKVBias, CacheKV, PreCaches, RotaryPosEmb, TimeStep, SeqLengths,
SrcMask, OutLinearW, OutLinearBias, FFNLnScale, FFNLnBias, FFN1Weight, FFN1Bias, FFN2Weight,
FFN2Bias; outputs CacheKVOut (in place on CacheKV), Out; attributes pre_layer_norm, epsilon,
dropout_rate, rotary_emb_dims, is_test, dropout_implementation, act_method ("Only support
`gelu`, `relu`, `none`"), trans_qkvw, ring_id. So in 2.6.2 the op has

- no RMSNorm: its norms are LayerNorms (`norm_type` came later, with Paddle 3.0);
- no SwiGLU: its FFN is ffn2(act(ffn1(x))) with act gelu/relu/none (swiglu came later);
- no grouped-query attention: one key/value head per query head (`gqa_group_size` came with
  Paddle PR #61300, January 2024, after the 2.6 branch);
- only GPT-J style ("interleaved") rotary embeddings (`use_neox_rotary_style` came later).

How a Llama block is mapped onto it anyway, exactly (same function, up to float rounding):

- RMSNorm as the op's LayerNorm on a mirrored stream: the op gets [x, -x] (width 2H). Its mean
  is 0 and its variance mean(x^2), so LayerNorm([x, -x]) = [x, -x] / sqrt(mean(x^2) + eps), which
  is RMSNorm of x (same eps) on the first half. The q/k/v weights read only the first half (zero
  rows for the second), and the attention output is written mirrored ([W_o, -W_o]), so the op's
  residual add keeps the stream mirrored; the program then takes the first H columns. Cost: the
  q/k/v and output projections do twice the multiply-adds (the FFN, 2/3 of a layer's weights,
  is not affected).
- The attention block alone: one op per layer, with a zero FFN (64 zero columns: out = residual
  + 0 exactly). The SwiGLU MLP runs after each op as ordinary ops, its gate and up projections
  concatenated into one [H, 2F] matmul ("ffn1", the layout of the later swiglu op) and split.
  The MLP's RMSNorm runs in float32 (cast in and out).
- GQA by repeating each key/value head for the query heads of its group (the documented
  workaround): head h of the op uses the original kv head h // G. The cache then holds
  num_attention_heads heads, G times the memory of a GQA cache (SmolLM2: 9 instead of 3).
- Rotary: Llama's rotate_half rotates (x[i], x[i + D/2]); the op rotates adjacent pairs
  (x[2i], x[2i+1]). Permuting the q and k output rows of every head to [0, D/2, 1, D/2 + 1, ...]
  makes one the other (q.k is unchanged by the same permutation of both). `rotary_embs` is
  [2, B, 1, S, D] (cos, sin), each angle repeated for both members of its pair, computed in the
  program from the position ids (float32, then cast to the model's dtype).

Precision: the weights are stored fp16, except the norm scales and biases, which the op's fp16
kernel reads as float32 (LayerNormParamType<half> = float); the op's layer norm and its softmax
accumulate in float32 inside the kernel; masks use -1e4 (finite in fp16; exp(-1e4) is 0 in
float32); the MLP's RMSNorm, the final RMSNorm and the logits are float32. The program is fp16
as exported, so the GPU Config does NOT ask for Paddle's mixed-precision pass
(engine/decoder_gpu.py).

Programs (same file names as the CPU decoder directory, model.json `"runtime":
"fused_multi_transformer"`, `"precision": "fp16"`; both read one params file):

    prefill: input_ids int64 [B, S], position_ids int64 [B, S], attention_mask float32 [B, S],
             cache_kv_i fp16 [2, B, heads, C, D] per layer, C <= max_len the batch's columns
             (written in place: columns 0..S-1)
             -> logits float32 [B, V] (the last column)
    decode:  input_ids int64 [B, 1], position_ids int64 [B, 1], attention_mask float32 [B, T+1],
             time_step int32 [1] (= T, on the CPU: the op requires CPUPlace), cache_kv_i
             -> logits float32 [B, V]; the op writes the new column T into cache_kv_i

The ops outside `fused_multi_transformer` are built with paddle.static; the fused op itself
cannot be (the CPU build refuses to append an unregistered op), so each layer's op is put into
the serialized ProgramDesc in place of a stand-in `assign`, with its inputs, outputs and
attributes, and feed/fetch ops are added the way `save_inference_model` writes them. Nothing is
run: exporting needs no kernel. The weight mapping is numpy (`fused_weights`) and `reference_*`
run the mapped weights through the op's documented computation in numpy, which the tests and
the converter compare with the CPU decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.engine.decoder_io import ATTENTION_MASK, DECODE_PROGRAM, INPUT_IDS, LOGITS, PARAMS_FILE, \
    POSITION_IDS, PREFILL_PROGRAM

FUSED_OP = "fused_multi_transformer"
FUSED_RUNTIME = "fused_multi_transformer"  # model.json "runtime" of this export
TIME_STEP = "time_step"
FUSED_MASK_VALUE = -1e4  # finite in fp16 (max 65504); exp(-1e4) underflows to exactly 0 in float32
ZERO_FFN = 64  # columns of the op's (zero) FFN: a whole vector of fp16 lanes for its fused kernels
FUSED_ACT = "gelu"  # gelu(0) = 0; the op's most used activation path
NORM_DTYPE = "float32"


def cache_names(num_layers: int) -> list[str]:
    return [f"cache_kv_{i}" for i in range(num_layers)]


def fused_prefill_inputs(num_layers: int) -> list[str]:
    return [INPUT_IDS, POSITION_IDS, ATTENTION_MASK, *cache_names(num_layers)]


def fused_decode_inputs(num_layers: int) -> list[str]:
    return [INPUT_IDS, POSITION_IDS, ATTENTION_MASK, TIME_STEP, *cache_names(num_layers)]


@dataclass(frozen=True)
class FusedLayout:
    """The shapes of the fused export of a DecoderConfig."""

    hidden: int
    heads: int  # query heads = key/value heads in the cache (kv heads repeated)
    kv_heads: int  # the checkpoint's key/value heads
    head_dim: int
    layers: int
    ffn: int
    vocab: int
    eps: float
    rope_theta: float
    rope_interleaved: bool
    tied: bool
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool

    @classmethod
    def of(cls, cfg) -> "FusedLayout":
        return cls(hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                   head_dim=cfg.dim_per_head, layers=cfg.num_hidden_layers, ffn=cfg.intermediate_size,
                   vocab=cfg.vocab_size, eps=float(cfg.rms_norm_eps), rope_theta=float(cfg.rope_theta),
                   rope_interleaved=bool(cfg.rope_interleaved), tied=bool(cfg.tie_word_embeddings),
                   qkv_bias=bool(cfg.attention_bias), out_bias=bool(cfg.out_bias), mlp_bias=bool(cfg.mlp_bias))

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @property
    def mirrored(self) -> int:
        return 2 * self.hidden

    def cache_shape(self, batch: int, max_len: int) -> list[int]:
        return [2, batch, self.heads, max_len, self.head_dim]


# ----------------------------------------------------------------------------- weights (numpy)


def interleave_permutation(head_dim: int) -> np.ndarray:
    """Index j of a head in the op's (adjacent pairs) order reads index perm[j] of rotate_half's order."""
    half = head_dim // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=-1).reshape(-1)


def _heads_rows(w_in_out: np.ndarray, n: int, d: int, perm: np.ndarray | None) -> np.ndarray:
    """Paddle Linear weight [H, n*d] -> [n, d, H] (the op's trans_qkvw layout), rows of each head
    permuted by `perm`."""
    w = w_in_out.T.reshape(n, d, -1)
    return w if perm is None else w[:, perm, :]


def _bias_heads(b: np.ndarray, n: int, d: int, perm: np.ndarray | None) -> np.ndarray:
    b = b.reshape(n, d)
    return b if perm is None else b[:, perm]


def fused_weights(cfg, weights: dict[str, np.ndarray], dtype: str = "float16") -> dict[str, np.ndarray]:
    """The CPU decoder's parameters (`decoder.DecoderForCausalLM` names, Linear [in, out]) mapped
    onto the fused export's persistable variables; norms float32, the rest `dtype`."""
    L = FusedLayout.of(cfg)
    H, n, kv, d, g = L.hidden, L.heads, L.kv_heads, L.head_dim, L.groups
    perm = None if L.rope_interleaved else interleave_permutation(d)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    out: dict[str, np.ndarray] = {}
    for i in range(L.layers):
        p = f"layers.{i}."
        q = _heads_rows(weights[p + "self_attn.q_proj.weight"], n, d, perm)
        k = np.repeat(_heads_rows(weights[p + "self_attn.k_proj.weight"], kv, d, perm), g, axis=0)
        v = np.repeat(_heads_rows(weights[p + "self_attn.v_proj.weight"], kv, d, None), g, axis=0)
        qkv = np.zeros((3, n, d, 2 * H), np.float32)
        qkv[..., :H] = np.stack([q, k, v])  # the mirrored half's rows stay zero
        qkv_b = np.zeros((3, n, d), np.float32)
        if L.qkv_bias:
            qkv_b[0] = _bias_heads(weights[p + "self_attn.q_proj.bias"], n, d, perm)
            qkv_b[1] = np.repeat(_bias_heads(weights[p + "self_attn.k_proj.bias"], kv, d, perm), g, axis=0)
            qkv_b[2] = np.repeat(_bias_heads(weights[p + "self_attn.v_proj.bias"], kv, d, None), g, axis=0)
        w_o = weights[p + "self_attn.o_proj.weight"]
        b_o = weights[p + "self_attn.o_proj.bias"] if L.out_bias else np.zeros(H, np.float32)
        g_attn = weights[p + "input_layernorm.weight"]
        mlp = lambda name: weights[p + f"mlp.{name}"]  # noqa: E731
        out.update({
            f"fmt_{i}_ln_scale": f32(np.concatenate([g_attn, g_attn])),
            f"fmt_{i}_ln_bias": f32(np.zeros(2 * H)),
            f"fmt_{i}_qkv_w": cast(qkv),
            f"fmt_{i}_qkv_b": cast(qkv_b),
            f"fmt_{i}_out_w": cast(np.concatenate([w_o, -w_o], axis=1)),
            f"fmt_{i}_out_b": cast(np.concatenate([b_o, -b_o])),
            f"fmt_{i}_ffn_ln_scale": f32(np.ones(2 * H)),
            f"fmt_{i}_ffn_ln_bias": f32(np.zeros(2 * H)),
            f"fmt_{i}_ffn1_w": cast(np.zeros((2 * H, ZERO_FFN))),
            f"fmt_{i}_ffn1_b": cast(np.zeros(ZERO_FFN)),
            f"fmt_{i}_ffn2_w": cast(np.zeros((ZERO_FFN, 2 * H))),
            f"fmt_{i}_ffn2_b": cast(np.zeros(2 * H)),
            f"mlp_{i}_norm": f32(weights[p + "post_attention_layernorm.weight"]),
            f"mlp_{i}_ffn1_w": cast(np.concatenate([mlp("gate_proj.weight"), mlp("up_proj.weight")], axis=1)),
            f"mlp_{i}_ffn2_w": cast(mlp("down_proj.weight")),
        })
        if L.mlp_bias:
            out[f"mlp_{i}_ffn1_b"] = cast(np.concatenate([mlp("gate_proj.bias"), mlp("up_proj.bias")]))
            out[f"mlp_{i}_ffn2_b"] = cast(mlp("down_proj.bias"))
    out["embed_tokens"] = cast(weights["embed_tokens.weight"])
    out["final_norm"] = f32(weights["norm.weight"])
    if not L.tied:
        out["lm_head"] = cast(weights["lm_head.weight"])
    return out


def rotary_embs(layout: FusedLayout, position_ids: np.ndarray) -> np.ndarray:
    """[2, B, 1, S, D] float32 (cos, sin) for the op: pair i's angle at columns 2i and 2i+1."""
    d = layout.head_dim
    inv_freq = 1.0 / (layout.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    freqs = position_ids.astype(np.float32)[..., None] * inv_freq  # [B, S, D/2]
    emb = np.repeat(freqs, 2, axis=-1)  # [f0, f0, f1, f1, ...]
    return np.stack([np.cos(emb), np.sin(emb)])[:, :, None]


# ----------------------------------------------------------------------------- numpy reference


def _layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _rope_pairs(x, cos, sin):
    """GPT-J rotation of adjacent pairs, as the op's rotary kernel: x [B, n, S, D], cos/sin [B, 1, S, D]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 0::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x2 * c + x1 * s
    return out


_erf = np.vectorize(math.erf)


def _gelu(x):
    """The op's gelu (the erf form)."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _fused_layer(w: dict, i: int, layout: FusedLayout, x, rope, bias, cache, start: int):
    """One `fused_multi_transformer` layer as its documented pseudo-code (pre_layer_norm, trans_qkvw),
    on the mirrored stream x [B, S, 2H]; the new keys/values are written into cache [2, B, n, L, D]
    at columns start..start+S-1 and attention reads columns 0..start+S-1 with `bias` added."""
    B, S, _ = x.shape
    ln = _layer_norm(x, w[f"fmt_{i}_ln_scale"], w[f"fmt_{i}_ln_bias"], layout.eps)
    qkv = np.einsum("bsk,thdk->tbhsd", ln, w[f"fmt_{i}_qkv_w"]) + w[f"fmt_{i}_qkv_b"][:, None, :, None, :]
    cos, sin = rope[0], rope[1]
    q, k, v = _rope_pairs(qkv[0], cos, sin), _rope_pairs(qkv[1], cos, sin), qkv[2]
    cache[0, :, :, start:start + S] = k
    cache[1, :, :, start:start + S] = v
    keys, values = cache[0, :, :, :start + S], cache[1, :, :, :start + S]
    scores = q @ keys.transpose(0, 1, 3, 2) / np.sqrt(layout.head_dim) + bias
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    ctx = (probs @ values).transpose(0, 2, 1, 3).reshape(B, S, -1)
    x = x + ctx @ w[f"fmt_{i}_out_w"] + w[f"fmt_{i}_out_b"]
    ffn = _layer_norm(x, w[f"fmt_{i}_ffn_ln_scale"], w[f"fmt_{i}_ffn_ln_bias"], layout.eps)
    ffn = _gelu(ffn @ w[f"fmt_{i}_ffn1_w"] + w[f"fmt_{i}_ffn1_b"]) @ w[f"fmt_{i}_ffn2_w"] + w[f"fmt_{i}_ffn2_b"]
    return x + ffn


def _rms(x, g, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def _outside_mlp(w: dict, i: int, layout: FusedLayout, x):
    h = _rms(x, w[f"mlp_{i}_norm"], layout.eps) @ w[f"mlp_{i}_ffn1_w"]
    if layout.mlp_bias:
        h = h + w[f"mlp_{i}_ffn1_b"]
    gate, up = h[..., :layout.ffn], h[..., layout.ffn:]
    out = (gate / (1.0 + np.exp(-gate)) * up) @ w[f"mlp_{i}_ffn2_w"]
    return x + (out + w[f"mlp_{i}_ffn2_b"] if layout.mlp_bias else out)


def _reference(w, layout, input_ids, position_ids, bias, caches, start):
    dt = caches[0].dtype  # the arithmetic's precision: float32 (the converter) or float64 (tests)
    w = {k: v.astype(dt) for k, v in w.items()}
    x = w["embed_tokens"][input_ids]
    bias = bias.astype(dt)
    rope = rotary_embs(layout, position_ids).astype(dt)
    for i in range(layout.layers):
        xm = _fused_layer(w, i, layout, np.concatenate([x, -x], axis=-1), rope, bias, caches[i], start)
        x = _outside_mlp(w, i, layout, xm[..., :layout.hidden])
    h = _rms(x[:, -1], w["final_norm"], layout.eps)
    return h @ (w["embed_tokens"].T if layout.tied else w["lm_head"])


def new_caches(layout: FusedLayout, batch: int, max_len: int, dtype=np.float64) -> list[np.ndarray]:
    """The op's caches for the numpy reference; their dtype is the reference's arithmetic."""
    return [np.zeros(layout.cache_shape(batch, max_len), dtype) for _ in range(layout.layers)]


def reference_prefill(w, layout, input_ids, position_ids, attention_mask, caches):
    """Logits [B, V] of the prefill program, computed in numpy (the caches' dtype) from the mapped weights."""
    S = input_ids.shape[1]
    visible = np.tril(np.ones((S, S), bool))[None] & (attention_mask[:, None, :] > 0)
    bias = np.where(visible, 0.0, FUSED_MASK_VALUE)[:, None]  # [B, 1, S, S]
    return _reference(w, layout, input_ids, position_ids, bias, caches, 0)


def reference_step(w, layout, input_ids, position_ids, attention_mask, caches, time_step: int):
    """Logits [B, V] of one decode step (the new token at column time_step)."""
    bias = np.where(attention_mask > 0, 0.0, FUSED_MASK_VALUE)[:, None, None, :]  # [B, 1, 1, T+1]
    return _reference(w, layout, input_ids, position_ids, bias, caches, time_step)


# ----------------------------------------------------------------------------- the programs


def _fused_attrs(layout: FusedLayout) -> dict:
    """The op's attributes, exactly the ones Paddle 2.6.2's op maker declares (others are not
    written: an unknown attribute would fail the op's checker when the predictor loads)."""
    return {"pre_layer_norm": True, "epsilon": float(layout.eps), "dropout_rate": 0.0, "rotary_emb_dims": 1,
            "is_test": True, "dropout_implementation": "upscale_in_train", "act_method": FUSED_ACT,
            "trans_qkvw": True, "ring_id": -1}


def fused_op_inputs(i: int, cache: str, decode: bool, mask: str, rope: str, x: str) -> dict[str, list[str]]:
    """Slot -> variable names of layer i's op (the 2.6.2 slots; SeqLengths and PreCaches unused)."""
    slots = {"X": [x], "LnScale": [f"fmt_{i}_ln_scale"], "LnBias": [f"fmt_{i}_ln_bias"],
             "QKVW": [f"fmt_{i}_qkv_w"], "QKVBias": [f"fmt_{i}_qkv_b"], "CacheKV": [cache],
             "RotaryPosEmb": [rope], "SrcMask": [mask], "OutLinearW": [f"fmt_{i}_out_w"],
             "OutLinearBias": [f"fmt_{i}_out_b"], "FFNLnScale": [f"fmt_{i}_ffn_ln_scale"],
             "FFNLnBias": [f"fmt_{i}_ffn_ln_bias"], "FFN1Weight": [f"fmt_{i}_ffn1_w"],
             "FFN1Bias": [f"fmt_{i}_ffn1_b"], "FFN2Weight": [f"fmt_{i}_ffn2_w"], "FFN2Bias": [f"fmt_{i}_ffn2_b"]}
    if decode:
        slots["TimeStep"] = [TIME_STEP]
    return slots


class _Builder:
    """Builds one program (prefill or decode) with paddle.static; `stand_ins` records, per layer,
    the `assign` op that stands where the fused op goes: (input var, output var, slot names)."""

    def __init__(self, layout: FusedLayout, max_len: int, dtype: str, decode: bool, shapes: dict[str, tuple]):
        self.layout, self.max_len, self.dtype, self.decode = layout, max_len, dtype, decode
        self.shapes = shapes
        self.stand_ins: list[tuple[str, str, dict]] = []

    def param(self, name: str):
        import paddle

        shape, dtype = self.shapes[name]
        return paddle.static.create_parameter(list(shape), dtype, name=name)

    def build(self):
        import paddle
        import paddle.nn.functional as F

        L, dt = self.layout, self.dtype
        s = 1 if self.decode else -1
        ids = paddle.static.data(INPUT_IDS, [-1, s], "int64")
        pos = paddle.static.data(POSITION_IDS, [-1, s], "int64")
        mask = paddle.static.data(ATTENTION_MASK, [-1, -1], "float32")
        if self.decode:
            paddle.static.data(TIME_STEP, [1], "int32")
        # Cache columns dynamic: the op takes max_len from the tensor it is given, so a batch's
        # cache is allocated for its own prompt + new tokens (at most self.max_len).
        caches = [paddle.static.data(n, [2, -1, L.heads, -1, L.head_dim], dt) for n in cache_names(L.layers)]
        embed = self._params["embed_tokens"]

        x = F.embedding(ids, embed)  # [B, S, H] dtype
        # Rotary angles [2, B, 1, S, D], pair i at columns 2i, 2i+1 (see rotary_embs).
        d = L.head_dim
        inv_freq = paddle.to_tensor(
            (1.0 / (L.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))).astype(np.float32))
        freqs = pos.astype("float32").unsqueeze(-1) * inv_freq
        emb = paddle.stack([freqs, freqs], axis=-1).flatten(start_axis=-2)
        rope = paddle.stack([emb.cos(), emb.sin()]).unsqueeze(2).astype(dt)
        if self.decode:
            bias = ((1.0 - mask) * FUSED_MASK_VALUE).unsqueeze([1, 2]).astype(dt)  # [B, 1, 1, T+1]
        else:
            n_cols = paddle.shape(mask)[1]
            col = paddle.arange(n_cols, dtype="int64")
            causal = (col.unsqueeze(0) <= col.unsqueeze(1)).astype("float32")  # [S, S]: key <= query
            visible = causal.unsqueeze(0) * mask.unsqueeze(1)  # [B, S, S]
            bias = ((1.0 - visible) * FUSED_MASK_VALUE).unsqueeze(1).astype(dt)  # [B, 1, S, S]

        for i in range(L.layers):
            xm = paddle.concat([x, -x], axis=-1)  # the mirrored stream: LayerNorm of it = RMSNorm of x
            y = paddle.assign(xm)  # stand-in for the fused op (replaced in the ProgramDesc)
            self.stand_ins.append((xm.name, y.name, fused_op_inputs(i, caches[i].name, self.decode, bias.name,
                                                                      rope.name, xm.name)))
            x = y[:, :, :L.hidden]
            h = self._rms(x, self._params[f"mlp_{i}_norm"])
            h = paddle.matmul(h, self._params[f"mlp_{i}_ffn1_w"])
            if L.mlp_bias:
                h = h + self._params[f"mlp_{i}_ffn1_b"]
            gate, up = paddle.split(h, 2, axis=-1)
            h = paddle.matmul(F.silu(gate) * up, self._params[f"mlp_{i}_ffn2_w"])
            if L.mlp_bias:
                h = h + self._params[f"mlp_{i}_ffn2_b"]
            x = x + h
        h = self._rms(x[:, -1], self._params["final_norm"])
        head = embed if L.tied else self._params["lm_head"]
        logits = paddle.matmul(h, head, transpose_y=L.tied).astype("float32")
        inputs = fused_decode_inputs(L.layers) if self.decode else fused_prefill_inputs(L.layers)
        return inputs, logits.name

    def _rms(self, x, weight):
        """RMSNorm in float32, back to the model's dtype."""
        import paddle

        x32 = x.astype("float32")
        out = x32 * paddle.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.layout.eps) * weight
        return out.astype(self.dtype)


def _param_shapes(arrays: dict[str, np.ndarray]) -> dict[str, tuple]:
    return {n: (tuple(a.shape), str(a.dtype)) for n, a in arrays.items()}


def build_static(layout: FusedLayout, shapes: dict[str, tuple], max_len: int, decode: bool, dtype: str):
    """The paddle.static Program before the fused ops go in (static mode must be on): (program,
    builder, input names, logits name). Its stand-ins are identities, so it runs on the CPU: the
    tests run it to check the rotary table and the mask the program computes."""
    import paddle

    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.static.program_guard(main, startup):
        b = _Builder(layout, max_len, dtype, decode, shapes)
        b._params = {name: b.param(name) for name in shapes}
        inputs, logits = b.build()
    return main, b, inputs, logits


def build_program_desc(layout: FusedLayout, shapes: dict[str, tuple], max_len: int, decode: bool,
                       dtype: str = "float16"):
    """The serialized ProgramDesc (framework_pb2) of the prefill or decode program: paddle.static
    builds everything but the fused ops, which then replace their stand-ins; feed and fetch ops
    added as save_inference_model writes them."""
    import paddle
    from paddle.base.proto import framework_pb2

    paddle.enable_static()
    try:
        main, b, inputs, logits = build_static(layout, shapes, max_len, decode, dtype)
        desc = framework_pb2.ProgramDesc.FromString(main.desc.serialize_to_string())
    finally:
        paddle.disable_static()
    block = desc.blocks[0]
    by_output = {next(o for o in op.outputs if o.parameter == "Out").arguments[0]: k
                 for k, op in enumerate(block.ops) if op.type == "assign"}
    for i, (_, out, slots) in enumerate(b.stand_ins):
        op = block.ops[by_output[out]]
        del op.inputs[:], op.outputs[:], op.attrs[:]
        op.type = FUSED_OP
        for slot, args in slots.items():
            op.inputs.add(parameter=slot, arguments=args)
        op.outputs.add(parameter="Out", arguments=[out])
        op.outputs.add(parameter="CacheKVOut", arguments=slots["CacheKV"])  # in place
        for name, value in _fused_attrs(layout).items():
            _set_attr(op.attrs.add(), name, value)
    _add_feed_fetch(block, inputs, [logits])
    _rename(desc, {logits: LOGITS})
    return desc


def _set_attr(attr, name: str, value) -> None:
    from paddle.base.proto import framework_pb2

    attr.name = name
    if isinstance(value, bool):
        attr.type, attr.b = framework_pb2.BOOLEAN, value
    elif isinstance(value, int):
        attr.type, attr.i = framework_pb2.INT, value
    elif isinstance(value, float):
        attr.type, attr.f = framework_pb2.FLOAT, value
    else:
        attr.type, attr.s = framework_pb2.STRING, str(value)


def _add_feed_fetch(block, feeds: list[str], fetches: list[str]) -> None:
    from paddle.base.proto import framework_pb2

    for name, kind in (("feed", framework_pb2.VarType.FEED_MINIBATCH), ("fetch", framework_pb2.VarType.FETCH_LIST)):
        v = block.vars.add()
        v.name, v.persistable, v.type.type = name, True, kind
    ops = list(block.ops)
    del block.ops[:]
    for col, name in enumerate(feeds):
        op = block.ops.add(type="feed")
        op.inputs.add(parameter="X", arguments=["feed"])
        op.outputs.add(parameter="Out", arguments=[name])
        _set_attr(op.attrs.add(), "col", col)
    block.ops.extend(ops)
    for col, name in enumerate(fetches):
        op = block.ops.add(type="fetch")
        op.inputs.add(parameter="X", arguments=[name])
        op.outputs.add(parameter="Out", arguments=["fetch"])
        _set_attr(op.attrs.add(), "col", col)


def _rename(desc, mapping: dict[str, str]) -> None:
    from pipeline.convert.decoder_export import rename_variables

    rename_variables(desc, mapping)


def save_params(arrays: dict[str, np.ndarray], path: Path) -> None:
    """One combined params file as Paddle Inference loads it (load_combine of the program's
    persistable variables sorted by name), written by Paddle's own save_combine op on the CPU."""
    import paddle

    paddle.enable_static()
    try:
        prog, scope = paddle.static.Program(), paddle.static.global_scope().new_scope()
        block = prog.global_block()
        place = paddle.CPUPlace()
        names = sorted(arrays)
        vars_ = []
        for n in names:
            a = arrays[n]
            vars_.append(block.create_var(name=n, shape=list(a.shape), dtype=str(a.dtype), persistable=True))
            scope.var(n).get_tensor().set(np.ascontiguousarray(a), place)
        from paddle.base import core

        raw = block.create_var(type=core.VarDesc.VarType.RAW, name="saved_params")
        raw.desc.set_persistable(True)
        block.append_op(type="save_combine", inputs={"X": vars_}, outputs={"Y": raw},
                        attrs={"file_path": str(path), "save_to_memory": False})
        paddle.static.Executor(place).run(prog, scope=scope)
    finally:
        paddle.disable_static()


def load_params(program_file: Path, params_file: Path) -> dict[str, np.ndarray]:
    """Read a combined params file back, by the persistable variables of `program_file` sorted by
    name (the order Paddle Inference loads them in)."""
    import paddle
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc.FromString(Path(program_file).read_bytes())
    block = desc.blocks[0]
    persist = sorted(v.name for v in block.vars if v.persistable and v.name not in ("feed", "fetch"))
    paddle.enable_static()
    try:
        prog, scope = paddle.static.Program(), paddle.static.global_scope().new_scope()
        b = prog.global_block()
        vars_ = [b.create_var(name=n, persistable=True) for n in persist]
        b.append_op(type="load_combine", inputs={}, outputs={"Out": vars_}, attrs={"file_path": str(params_file)})
        paddle.static.Executor(paddle.CPUPlace()).run(prog, scope=scope)
        return {n: np.array(scope.find_var(n).get_tensor()) for n in persist}
    finally:
        paddle.disable_static()


def write_fused_programs(cfg, arrays: dict[str, np.ndarray], out_dir: Path, max_len: int,
                         dtype: str = "float16") -> dict[str, int]:
    """prefill.pdmodel, decode.pdmodel and the one decoder.pdiparams into out_dir; file sizes."""
    layout = FusedLayout.of(cfg)
    out_dir = Path(out_dir)
    shapes = _param_shapes(arrays)
    for name, decode in ((PREFILL_PROGRAM, False), (DECODE_PROGRAM, True)):
        desc = build_program_desc(layout, shapes, max_len, decode, dtype)
        (out_dir / name).write_bytes(desc.SerializeToString())
    save_params(arrays, out_dir / PARAMS_FILE)
    return {f: (out_dir / f).stat().st_size for f in (PREFILL_PROGRAM, DECODE_PROGRAM, PARAMS_FILE)}


# ----------------------------------------------------------------------------- conversion

FUSED_MAX_LEN = 4096  # the op's prompt pass softmax takes at most 4096 columns (fused_softmax_mask.cu.h)
FUSED_PROBE_ATOL = 1e-3  # float32 mapping vs the float32 CPU model (the numpy reference sums in float32)


def check_mapping(model, mapped_fp32: dict, steps: int = 4) -> dict:
    """The mapped (float32) weights through the op's documented computation in numpy
    (`reference_prefill`/`reference_step`) against the dynamic-graph CPU model on the converter's
    probe batch (prefill + `steps` decode steps, the model's greedy tokens fed): the mapping's
    check. Returns {"max_abs_logit_diff", "limit"}; ConversionError past the limit."""
    import paddle

    from pipeline.convert.decoder_convert import probe_batch
    from pipeline.convert.errors import ConversionError

    layout = FusedLayout.of(model.cfg)
    ids, mask, pos = probe_batch(model.cfg.vocab_size)
    caches = new_caches(layout, ids.shape[0], ids.shape[1] + steps, np.float32)
    errs = []
    with paddle.no_grad():
        want, cache = model(paddle.to_tensor(ids), paddle.to_tensor(pos), paddle.to_tensor(mask))
        want = want.numpy()[:, -1]
        errs.append(float(np.abs(reference_prefill(mapped_fp32, layout, ids, pos, mask, caches) - want).max()))
        next_pos = pos[:, -1:] + 1
        for _ in range(steps):
            tok = want.argmax(-1)[:, None].astype(np.int64)
            t = mask.shape[1]
            mask = np.concatenate([mask, np.ones_like(tok)], axis=1)
            want, cache = model(paddle.to_tensor(tok), paddle.to_tensor(next_pos), paddle.to_tensor(mask), cache)
            want = want.numpy()[:, -1]
            got = reference_step(mapped_fp32, layout, tok, next_pos, mask, caches, t)
            errs.append(float(np.abs(got - want).max()))
            next_pos = next_pos + 1
    err = max(errs)
    if not err < FUSED_PROBE_ATOL:
        raise ConversionError(f"the fused weight mapping differs from the model by {err:.3g} (limit {FUSED_PROBE_ATOL})")
    return {"max_abs_logit_diff": err, "limit": FUSED_PROBE_ATOL, "prompt_lengths": [int(n) for n in mask.sum(1) - steps],
            "decode_steps": steps, "what": "numpy reference of the op's documented computation on the float32 "
                                          "mapping vs the CPU model; the fp16 kernels are not run"}


def convert_decoder_fused(src, dst, force: bool = False, name: str | None = None,
                          max_seq_len: int | None = None) -> Path:
    """Decoder checkpoint -> the fused fp16 GPU runtime directory (`convert SRC DST --target gpu`)."""
    import zlib  # noqa: F401 - must precede paddle 2.6's first import (it breaks zlib otherwise)
    import json

    from pipeline import __version__
    from pipeline.convert.decoder_convert import DEFAULT_MAX_SEQ_LEN, _build_model, read_source, source_files, \
        source_record, special_tokens
    from pipeline.convert.errors import ConversionError
    from pipeline.engine.decoder_modeldir import DECODER_FORMAT_VERSION, DECODER_PROGRAM_REVISION, GENERATE_TASK, \
        TOKENIZER_FILE, DecoderModelInfo
    from pipeline.engine.modeldir import MODEL_JSON, ModelDirError, load_model_info, sha256_file, staged_dir

    src, dst = Path(src), Path(dst)
    if dst.exists() and not force:
        raise ConversionError(f"{dst} exists; pass --force to overwrite it")
    ckpt = read_source(src)
    cfg = ckpt.config
    seq = max_seq_len or min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    top = min(cfg.max_position_embeddings, FUSED_MAX_LEN)
    if not 2 <= seq <= top:
        raise ConversionError(f"max_seq_len {seq} must be in 2..{top} (the model's max_position_embeddings, and "
                              f"{FUSED_MAX_LEN}: the fused op's prompt pass takes at most that many columns)")
    special = special_tokens(ckpt, src)
    source = source_record(src, source_files(ckpt, src))

    import paddle

    paddle.set_device("cpu")
    model = _build_model(ckpt)
    weights = {n: p.numpy() for n, p in model.named_parameters()}
    ckpt.weights.clear()
    validation = check_mapping(model, fused_weights(cfg, weights, "float32"))
    arrays = fused_weights(cfg, weights, "float16")
    del weights
    layout = FusedLayout.of(cfg)
    with staged_dir(dst) as stage:
        write_fused_programs(cfg, arrays, stage.path, seq)
        ckpt.tokenizer.save(str(stage.path / TOKENIZER_FILE))
        meta = {
            "format_version": DECODER_FORMAT_VERSION, "task": GENERATE_TASK, "output": "tokens",
            "name": name or ckpt.name, "architecture": cfg.to_dict(), "max_seq_len": seq,
            "special_tokens": special, "add_bos_token": bool(ckpt.add_bos_token),
            "chat_template": ckpt.chat_template, "precision": "fp16", "runtime": FUSED_RUNTIME,
            "fused": {"op": FUSED_OP, "max_len": seq, "cache_heads": layout.heads, "kv_heads_repeated": layout.groups,
                      "rotary": "interleaved (q/k rows permuted)" if not layout.rope_interleaved else "interleaved",
                      "norm": "RMSNorm as LayerNorm of the mirrored stream [x, -x]",
                      "mlp": "SwiGLU outside the op (zero FFN inside)", "attrs": _fused_attrs(layout),
                      "verified": "exported and mapped on the CPU build; never run (no GPU)"},
            "program_revision": DECODER_PROGRAM_REVISION, "source": source,
            "params_sha256": sha256_file(stage.path / PARAMS_FILE),
            "tokenizer_sha256": sha256_file(stage.path / TOKENIZER_FILE),
            "converted_by": f"pipeline {__version__}, paddle {paddle.__version__}", "validation": validation,
        }
        (stage.path / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        try:
            info = load_model_info(stage.path)
        except ModelDirError as e:
            raise ConversionError(f"the converted directory does not load: {e}") from e
        if not isinstance(info, DecoderModelInfo):
            raise ConversionError(f"the converted directory loads as a {type(info).__name__}, not a decoder")
    return dst
