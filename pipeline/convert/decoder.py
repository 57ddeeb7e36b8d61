"""A decoder-only transformer (Llama family, ERNIE 4.5 dense) as one readable Paddle module.

Llama, SmolLM2, Qwen2-style and ERNIE 4.5 dense models share one block: pre-norm RMSNorm,
rotary position embeddings on q and k, grouped-query attention (several query heads share one
key/value head), a SwiGLU feed-forward (down(silu(gate(x)) * up(x))), a final RMSNorm and an
output head that is either the token embedding itself (tied) or a separate [H, V] matrix. What
differs between them is in `DecoderConfig`:

- `rope_interleaved`: Llama rotates the two halves of each head (Hugging Face `rotate_half`,
  "NeoX style"); ERNIE 4.5 rotates adjacent pairs (GPT-J style). The two are the same function
  of the weights up to a permutation of the q/k rows (llama.cpp's converter applies exactly
  that permutation, see `gguf_checkpoint.unpermute_qk`).
- biases: `attention_bias` on q/k/v (and o unless `attention_out_bias` says otherwise; ERNIE
  4.5's single `use_bias` covers q, k, v and o alike, as transformers' Ernie4_5 has it),
  `mlp_bias` on gate/up/down.
- `head_dim` when it is not hidden_size / num_attention_heads (ERNIE 4.5, Qwen3).

Parameter names are Hugging Face's without the `model.` prefix (PaddleNLP's without `llama.`):
`embed_tokens`, `layers.N.self_attn.{q,k,v,o}_proj`, `layers.N.mlp.{gate,up,down}_proj`,
`layers.N.{input,post_attention}_layernorm`, `norm`, `lm_head` (absent when tied). Linear
weights are Paddle's [in, out], the transpose of torch's.

Batches are left-padded ("pre-padding", as EET does): every row's last prompt token sits in the
last column, so every row generates at the same column and one decode step is one [B, 1] call.
The model itself only needs three things from the caller: `attention_mask` (1 real, 0 padding)
over the cached and new columns, `position_ids` counted over real tokens only
(`position_ids_from_mask`), and the per-layer key/value cache it returned last time. A query
attends a key iff the key is not padding and not in the query's future; nothing in a row's
outputs depends on how much padding its batch needed.

Only float32, and no rope scaling (Llama 3.1's `rope_scaling` is refused at conversion).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

# Added to the attention scores of keys a query must not see. Finite, so that a query that sees
# no key at all (a padding column of a left-padded prompt) gets a uniform softmax instead of NaN;
# exp(-1e9 - max) is exactly 0 in float32, so real queries ignore masked keys exactly.
MASK_VALUE = -1e9

# One layer's cache: (key, value), each [B, num_key_value_heads, T, head_dim], keys after RoPE.
KeyValue = tuple[paddle.Tensor, paddle.Tensor]


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_interleaved: bool = False  # False: Llama rotate_half; True: ERNIE 4.5 adjacent pairs
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v (and o, unless attention_out_bias says otherwise)
    attention_out_bias: Optional[bool] = None  # None: same as attention_bias
    mlp_bias: bool = False
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    model_type: str = "llama"  # where the checkpoint came from; the module does not branch on it
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        assert self.vocab_size > 0 and self.num_hidden_layers > 0 and self.intermediate_size > 0
        assert self.num_attention_heads % self.num_key_value_heads == 0, (
            f"num_attention_heads {self.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)"
        )
        if self.head_dim is None:
            assert self.hidden_size % self.num_attention_heads == 0, (
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}; give head_dim explicitly"
            )
        assert self.dim_per_head % 2 == 0, f"RoPE needs an even head_dim, got {self.dim_per_head}"

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def out_bias(self) -> bool:
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def position_ids_from_mask(attention_mask):
    """Positions counted over real tokens: 0 at a row's first real token (EET's pre-padding).

    Padding columns get 0 (they are never attended, so their value only has to be in range).
    """
    mask = attention_mask.astype("int64")
    return paddle.clip(paddle.cumsum(mask, axis=-1) - 1, min=0) * mask


def mask_bias(attention_mask, num_new: int):
    """[B, T] mask (1 real, 0 padding) over cached + new columns -> additive bias [B, 1, 1, S, T].

    The new S tokens are the last S columns. The query in new column i sits at absolute column
    P + i (P = T - S cached columns) and may see key column j iff j <= P + i and j is real.
    The two singleton axes broadcast over key/value heads and the query heads of a group.
    """
    total = paddle.shape(attention_mask)[1]
    key_col = paddle.arange(total, dtype="int64").unsqueeze(0)  # [1, T]
    query_col = (paddle.arange(num_new, dtype="int64") + (total - num_new)).unsqueeze(1)  # [S, 1]
    causal = key_col <= query_col  # [S, T]
    real_key = attention_mask.astype("bool").unsqueeze(1)  # [B, 1, T]
    visible = paddle.logical_and(causal.unsqueeze(0), real_key)  # [B, S, T]
    bias = (1.0 - visible.astype("float32")) * MASK_VALUE
    return bias.unsqueeze([1, 2])


class RMSNorm(nn.Layer):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([size], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        return x * paddle.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RotaryEmbedding(nn.Layer):
    """cos/sin of position * inv_freq, computed from the position ids of each call.

    Computed per call rather than looked up in a [max_positions, D] table: the table would be a
    constant as large as a layer's weights at an 8k context, and the product is cheap next to
    the projections. float32 as in Hugging Face and PaddleNLP (their tables hold the same
    products).
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d = cfg.dim_per_head
        self.interleaved = cfg.rope_interleaved
        inv_freq = 1.0 / (cfg.rope_theta ** (paddle.arange(0, d, 2, dtype="float32") / d))
        self.register_buffer("inv_freq", inv_freq, persistable=False)

    def forward(self, position_ids):
        """position_ids [B, S] -> cos, sin [B, 1, S, D], laid out for `apply`."""
        freqs = position_ids.astype("float32").unsqueeze(-1) * self.inv_freq  # [B, S, D/2]
        if self.interleaved:
            # Adjacent pairs (x[2i], x[2i+1]) rotate by the same angle.
            emb = paddle.stack([freqs, freqs], axis=-1).flatten(start_axis=-2)
        else:
            # Halves (x[i], x[i + D/2]) rotate by the same angle.
            emb = paddle.concat([freqs, freqs], axis=-1)
        return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)

    def apply(self, x, cos, sin):
        """x [B, heads, S, D] rotated by its positions' angles."""
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            rotated = paddle.stack([-x2, x1], axis=-1).flatten(start_axis=-2)
        else:
            half = x.shape[-1] // 2
            rotated = paddle.concat([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin


class Attention(nn.Layer):
    """Grouped-query self-attention with a key/value cache.

    Query head h uses key/value head h // num_groups. Rather than repeating every cached key
    num_groups times, the queries of a group are stacked on an axis of their own and the one
    key/value head broadcasts over it: [B, KV, G, S, D] x [B, KV, 1, D, T].
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.num_groups = cfg.num_groups
        self.head_dim = cfg.dim_per_head
        qkv_bias = None if cfg.attention_bias else False
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias_attr=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias_attr=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias_attr=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size,
                                bias_attr=None if cfg.out_bias else False)

    def _heads(self, t, n):
        # [B, S, n * D] -> [B, n, S, D]
        return t.reshape([0, 0, n, self.head_dim]).transpose([0, 2, 1, 3])

    def forward(self, x, rope: RotaryEmbedding, cos, sin, bias, past: Optional[KeyValue]):
        q = rope.apply(self._heads(self.q_proj(x), self.num_heads), cos, sin)
        k = rope.apply(self._heads(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if past is not None:
            k = paddle.concat([past[0], k], axis=2)
            v = paddle.concat([past[1], v], axis=2)

        # q heads are ordered kv-head-major, so [B, H, S, D] -> [B, KV, G, S, D] groups them.
        q = q.reshape([0, self.num_kv_heads, self.num_groups, -1, self.head_dim])
        scores = paddle.matmul(q, k.unsqueeze(2), transpose_y=True) * (self.head_dim ** -0.5)
        probs = F.softmax(scores + bias, axis=-1)  # [B, KV, G, S, T]
        ctx = paddle.matmul(probs, v.unsqueeze(2))  # [B, KV, G, S, D]
        ctx = ctx.reshape([0, self.num_heads, -1, self.head_dim]).transpose([0, 2, 1, 3])
        return self.o_proj(ctx.reshape([0, 0, self.num_heads * self.head_dim])), (k, v)


class MLP(nn.Layer):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        b = None if cfg.mlp_bias else False
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias_attr=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias_attr=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias_attr=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Layer):
    """Pre-norm block: x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, cos, sin, bias, past):
        attn, present = self.self_attn(self.input_layernorm(x), rope, cos, sin, bias, past)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), present


class DecoderForCausalLM(nn.Layer):
    """Token ids -> next-token logits, with the key/value cache in and out.

    forward(input_ids, position_ids, attention_mask, past_key_values=None):
    - input_ids, position_ids: int64 [B, S], the S new tokens (the whole left-padded prompt at
      prefill, one token per row at a decode step);
    - attention_mask: [B, P + S] (int or float, 1 real, 0 padding) over the P cached columns and
      the S new ones, so P = 0 without a cache;
    - past_key_values: None, or one (key, value) per layer as returned by the previous call,
      each [B, num_key_value_heads, P, head_dim].
    Returns logits float32 [B, S, V] and the new cache (one (key, value) per layer, P + S long).
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg)
        self.layers = nn.LayerList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias_attr=False)

    def forward(self, input_ids, position_ids, attention_mask, past_key_values: Optional[list[KeyValue]] = None):
        if past_key_values is not None:
            assert len(past_key_values) == self.cfg.num_hidden_layers, (
                f"past_key_values has {len(past_key_values)} layers, the model {self.cfg.num_hidden_layers}")
        # Shared by every layer: the mask bias and the rotary angles of the new tokens.
        bias = mask_bias(attention_mask, input_ids.shape[1])
        cos, sin = self.rotary(position_ids)
        x = self.embed_tokens(input_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, self.rotary, cos, sin, bias,
                               None if past_key_values is None else past_key_values[i])
            presents.append(present)
        return self.logits(self.norm(x)), presents

    def logits(self, hidden):
        if self.cfg.tie_word_embeddings:
            return paddle.matmul(hidden, self.embed_tokens.weight, transpose_y=True)
        return self.lm_head(hidden)

    def expected_shapes(self) -> dict[str, list[int]]:
        """Every parameter's name and shape: what a converter must supply, no more, no less."""
        return {name: list(p.shape) for name, p in self.named_parameters()}

    def load_weights(self, weights: dict) -> None:
        """Set every parameter from a {name: array} dict in our names; names and shapes must match."""
        want = self.expected_shapes()
        missing = sorted(set(want) - set(weights))
        extra = sorted(set(weights) - set(want))
        assert not missing and not extra, f"weights do not match the config: missing {missing[:5]}, extra {extra[:5]}"
        state = {}
        for name, shape in want.items():
            got = list(weights[name].shape)
            assert got == shape, f"{name}: shape {got}, the config wants {shape}"
            state[name] = weights[name]
        self.set_state_dict(state)


def greedy_generate(model: DecoderForCausalLM, input_ids, attention_mask, max_new_tokens: int,
                    eos_token_id: Optional[int] = None, pad_token_id: int = 0):
    """Greedy decoding of a left-padded batch: one prefill, then one cached step per token.

    A reference loop for tests and the converter's validation, not the engine. Rows that produced
    eos keep emitting pad_token_id. Returns int64 [B, max_new_tokens] (paddle).
    """
    mask = paddle.to_tensor(attention_mask).astype("int64")
    ids = paddle.to_tensor(input_ids).astype("int64")
    positions = position_ids_from_mask(mask)
    next_pos = positions[:, -1:] + 1
    done = paddle.zeros([ids.shape[0], 1], dtype="bool")
    out = []
    with paddle.no_grad():
        logits, cache = model(ids, positions, mask)
        for step in range(max_new_tokens):
            tok = paddle.argmax(logits[:, -1], axis=-1, keepdim=True)  # [B, 1]
            if eos_token_id is not None:
                tok = paddle.where(done, paddle.full_like(tok, pad_token_id), tok)
                done = paddle.logical_or(done, tok == eos_token_id)
            out.append(tok)
            if step + 1 == max_new_tokens:
                break
            mask = paddle.concat([mask, paddle.ones_like(tok)], axis=1)
            logits, cache = model(tok, next_pos, mask, cache)
            next_pos = next_pos + 1
    return paddle.concat(out, axis=1)
