"""The ERNIE encoder as one readable Paddle module, top-down.

ERNIE 1.0/2.0/3.0 and BERT share one architecture: word + position + token-type (+ task-type
for ERNIE 3.0) embeddings, a layer norm, then post-LN transformer layers with exact GELU. The
scoring heads on top are the two this project needs:

- `cross`: the pooler (dense + tanh on [CLS]) and a classification layer; one score per pair.
- `bi`: mean pooling over real tokens, then L2 normalisation; the embedding of one text.

Parameter names follow PaddleNLP's `ErnieModel` (`embeddings.*`, `encoder.layers.N.*`,
`pooler.dense`, `classifier`) so its checkpoints map one-to-one, except for the attention
projections, whose layout is chosen at export (`ErnieConfig.fused_qkv`):

- fused (default, the CPU export): one `qkv_proj` [H, 3H] split into q, k, v: one GEMM is faster
  than three [H, H] ones on the CPU (oneDNN), and the converter concatenates them.
- separate (`fused_qkv=False`, the GPU export): `q_proj`, `k_proj`, `v_proj`, slices of the same
  fused weight, and the 1/sqrt(d) scale applied to q before QK^T (as PaddleNLP's attention does).
  That is the pattern Paddle's GPU multi-head attention fusion matches
  (`multihead_matmul_fuse_pass_v2`; TensorRT's `trt_multihead_matmul_fuse_pass_v2` has the same
  shape): three Linear layers reading one input, each followed by reshape2 + transpose2, a scale
  on the q branch. A split never matches it, so the CPU export runs unfused attention on a GPU.
  Both layouts give the same outputs (tests/test_predictor.py).

Only this module, `convert` and `predictor` import paddle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

SCORING_MODES = ("cross", "bi")


@dataclass(frozen=True)
class ErnieConfig:
    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    task_type_vocab_size: int = 0  # 0: no task-type embeddings (BERT, ERNIE 1.0/2.0)
    task_id: int = 0  # the task-type row ERNIE 3.0 adds to every token
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 0  # classifier outputs; 0 means the checkpoint has no classifier
    fused_qkv: bool = True  # one qkv_proj (CPU export) or q/k/v_proj (GPU export, see the module doc)
    # GPU export: position ids are a model input (0..n-1 on real tokens, 0 on padding) instead of
    # a range computed in the program: Paddle's variable-length TensorRT path reads the sequence
    # lengths from that input (`batching.position_ids`).
    position_ids_input: bool = False

    def __post_init__(self) -> None:
        assert self.hidden_size % self.num_attention_heads == 0, (
            f"hidden_size {self.hidden_size} is not a multiple of "
            f"num_attention_heads {self.num_attention_heads}"
        )
        assert self.hidden_act == "gelu", f"only exact GELU is supported, got {self.hidden_act!r}"
        assert self.vocab_size > 0 and self.num_hidden_layers > 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ErnieConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class ErnieEmbeddings(nn.Layer):
    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        if cfg.task_type_vocab_size > 0:
            self.task_type_embeddings = nn.Embedding(cfg.task_type_vocab_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)

    def forward(self, input_ids, token_type_ids, position_ids=None):
        if position_ids is None:
            seq_len = paddle.shape(input_ids)[1]
            position_ids = paddle.arange(seq_len, dtype="int64").unsqueeze(0)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        if self.cfg.task_type_vocab_size > 0:
            # Every token carries the same task id, so one row broadcast over the batch is
            # the same as PaddleNLP's lookup of a tensor full of task_id, without the lookup.
            x = x + self.task_type_embeddings.weight[self.cfg.task_id]
        return self.layer_norm(x)


class ErnieLayer(nn.Layer):
    """Post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.hidden_size = cfg.hidden_size
        self.fused_qkv = cfg.fused_qkv
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
            self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
            self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)
        self.linear1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)

    def _heads(self, t):
        # [B, S, H] -> [B, heads, S, head_dim]; reshape + transpose feeding a matmul is the
        # pattern oneDNN's reshape_transpose_matmul fuse pass folds away.
        return t.reshape([0, 0, self.num_heads, self.head_dim]).transpose([0, 2, 1, 3])

    def forward(self, x, attn_bias):
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.fused_qkv:
            q, k, v = paddle.split(self.qkv_proj(x), 3, axis=-1)
            scores = paddle.matmul(self._heads(q), self._heads(k), transpose_y=True) * scale + attn_bias
        else:
            # GPU layout: the scale sits on q, where the multihead_matmul fuse pattern expects it.
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            scores = paddle.matmul(self._heads(q) * scale, self._heads(k), transpose_y=True) + attn_bias
        ctx = paddle.matmul(F.softmax(scores, axis=-1), self._heads(v))
        ctx = ctx.transpose([0, 2, 1, 3]).reshape([0, 0, self.hidden_size])
        x = self.norm1(x + self.out_proj(ctx))
        return self.norm2(x + self.linear2(F.gelu(self.linear1(x), approximate=False)))


class ErnieEncoder(nn.Layer):
    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.layers = nn.LayerList([ErnieLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x, attn_bias):
        for layer in self.layers:
            x = layer(x, attn_bias)
        return x


class ErniePooler(nn.Layer):
    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden):
        return paddle.tanh(self.dense(hidden[:, 0]))


class ErnieScorer(nn.Layer):
    """Encoder plus the head of one scoring mode; the exported program is exactly this forward.

    Inputs are padded batches: input_ids and token_type_ids int64 [B, S], attention_mask
    float32 [B, S] with 1 for real tokens and 0 for padding, and with `position_ids_input`
    position_ids int64 [B, S] (`batching.position_ids`; padding rows only reach padded tokens,
    which the mask hides, so the outputs do not change).
    Output: `cross` -> score float32 [B]; `bi` -> L2-normalised embedding float32 [B, H].
    """

    def __init__(self, cfg: ErnieConfig, mode: str):
        super().__init__()
        assert mode in SCORING_MODES, f"mode must be one of {SCORING_MODES}, got {mode!r}"
        self.cfg = cfg
        self.mode = mode
        self.embeddings = ErnieEmbeddings(cfg)
        self.encoder = ErnieEncoder(cfg)
        # The head's layers sit on the scorer itself (`pooler`, `classifier`), not in a head
        # module, so parameter names stay PaddleNLP's and older exports keep theirs.
        self.head = {"cross": self._add_score_head, "bi": self._add_embedding_head}[mode]()

    def forward(self, input_ids, token_type_ids, attention_mask, position_ids=None):
        assert (position_ids is not None) == self.cfg.position_ids_input, (
            "position_ids must be given exactly when the config says position_ids_input")
        # Built once per batch and shared by every layer: 0 for real tokens, -1e4 for padding
        # (the value PaddleNLP uses; exp(-1e4) is exactly 0 in float32), shape [B, 1, 1, S].
        attn_bias = ((1.0 - attention_mask) * -1e4).unsqueeze([1, 2])
        hidden = self.encoder(self.embeddings(input_ids, token_type_ids, position_ids), attn_bias)
        return self.head(hidden, attention_mask)

    def _add_score_head(self):
        assert self.cfg.num_labels > 0, "cross scoring needs a checkpoint with a classifier head"
        self.pooler = ErniePooler(self.cfg)
        self.classifier = nn.Linear(self.cfg.hidden_size, self.cfg.num_labels)
        return self._score

    def _score(self, hidden, attention_mask):
        logits = self.classifier(self.pooler(hidden))
        if self.cfg.num_labels == 1:
            return logits[:, 0]
        # Several classes: the probability of class 1 ("relevant") is the score.
        return F.softmax(logits, axis=-1)[:, 1]

    def _add_embedding_head(self):
        return self._mean_pool

    @staticmethod
    def _mean_pool(hidden, attention_mask):
        mask = attention_mask.unsqueeze(-1)
        summed = (hidden * mask).sum(axis=1)
        mean = summed / paddle.clip(mask.sum(axis=1), min=1e-9)
        return F.normalize(mean, p=2, axis=-1, epsilon=1e-12)


def input_specs(position_ids_input: bool = False):
    from paddle.static import InputSpec

    specs = [
        InputSpec([None, None], "int64", "input_ids"),
        InputSpec([None, None], "int64", "token_type_ids"),
        InputSpec([None, None], "float32", "attention_mask"),
    ]
    if position_ids_input:
        specs.append(InputSpec([None, None], "int64", "position_ids"))
    return specs
