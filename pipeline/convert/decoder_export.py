"""A `DecoderForCausalLM` exported as two Paddle Inference programs: prefill and decode step.

Layout of the programs inside one runtime directory (`write_decoder_programs`):

    prefill.pdmodel     the prompt pass
    decode.pdmodel      one new token per row
    decoder.pdiparams   the weights, ONE file read by both programs

Both programs are traced from the same module, so they hold the same persistable variables
under the same names and `paddle.jit.save` writes byte-identical params files for them; the
export checks that and keeps one copy. SmolLM2-135M fp32: decoder.pdiparams 538 MB (instead of
1.08 GB for two), prefill.pdmodel 1.3 MB, decode.pdmodel 1.2 MB; about 20 s to read the GGUF
and export. Paddle Inference still loads the weights once per predictor: a process holding both
predictors holds them twice (measured +1.24 GB RSS for the two SmolLM2 predictors). One program
for both (a decode program taking S new tokens and a zero-length past) would hold them once,
but needs zero-size tensors through oneDNN; not tried.

Every input and output is named (`prefill_io`, `decode_io`; outputs are renamed in the saved
ProgramDesc, since tracing gives them generated names). Dims marked `B`, `S`, `T` are dynamic:

prefill (the left-padded prompts, S columns):
    inputs  input_ids int64 [B, S], position_ids int64 [B, S], attention_mask float32 [B, S]
    outputs logits float32 [B, V] (the last column's, which every row predicts from under
            left padding), present_key_i / present_value_i float32 [B, KV, S, D] per layer i
            (keys after RoPE)

decode (one step: T cached columns, one new token per row):
    inputs  input_ids int64 [B, 1], position_ids int64 [B, 1], attention_mask float32 [B, T+1],
            past_key_i / past_value_i float32 [B, KV, T, D] per layer i
    outputs logits float32 [B, V], new_key_i / new_value_i float32 [B, KV, 1, D] per layer i:
            only the new column; the host writes it into its preallocated cache at column T

Only the last position's logits leave the prefill program: the output head is applied to the
last column's hidden state alone (at batch 8 x 512 the full [B, S, V] head would be 230 GFLOP
and 800 MB of output for one useful column per row).

The decode step computes attention against the cache without concatenating the new column to
it (the module's `paddle.concat([past, k])` would copy every layer's whole cache once per step):
the scores of the cached columns and of the new one are computed separately, joined (a
[B, KV, G, T+1] tensor, 1/D of the cache's size), soft-maxed together, and the context is
the cached part's matmul plus the new column's weighted value. Same function as the module up
to float rounding; the tests check it against the module's full forward. Measured on
SmolLM2-135M, batch 8, 2 threads, the program alone at a fixed context: 105 / 107 / 114 ms at
contexts 32 / 128 / 512, against 109 / 123 / 173 ms for the module's concatenating step.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.base.proto import framework_pb2
from paddle.static import InputSpec

from pipeline.convert.decoder import mask_bias
from pipeline.engine.decoder_io import (  # the runtime owns the program names; the export follows them
    ATTENTION_MASK,
    DECODE_PROGRAM,
    INPUT_IDS,
    PARAMS_FILE,
    POSITION_IDS,
    PREFILL_PROGRAM,
    decode_io,
    past_names,
    prefill_io,
)
from pipeline.engine.modeldir import sha256_file

# ----------------------------------------------------------------------------- the two programs


class PrefillProgram(nn.Layer):
    """The prompt pass: logits of the last column and every layer's keys and values."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    # Traced, not transpiled: `to_static` runs this forward once on static variables and records
    # its ops. The code has no control flow on tensor values (the layer loop is over a Python
    # list), so dy2static's AST conversion of every callee would only cost time (SmolLM2: 79 s
    # of inspect.stack calls for the two programs, against a few seconds traced); the programs'
    # check against the module (`check_programs`, the export tests) holds either way.
    @paddle.jit.not_to_static
    def forward(self, input_ids, position_ids, attention_mask):
        m = self.m
        bias = mask_bias(attention_mask, paddle.shape(input_ids)[1])
        cos, sin = m.rotary(position_ids)
        x = m.embed_tokens(input_ids)
        presents = []
        for layer in m.layers:
            x, (k, v) = layer(x, m.rotary, cos, sin, bias, None)
            presents += [k, v]
        return [m.logits(m.norm(x[:, -1])), *presents]


def step_attention(attn, x, rope, cos, sin, bias, past_k, past_v):
    """One new token per row against a [B, KV, T, D] cache, without concatenating to it.

    `attn` is a `decoder.Attention`; bias [B, 1, 1, T+1]. Returns the attention output
    [B, 1, H] and the new key (after RoPE) and value [B, KV, 1, D]."""
    kv, g, d = attn.num_kv_heads, attn.num_groups, attn.head_dim
    q = rope.apply(attn._heads(attn.q_proj(x), attn.num_heads), cos, sin)  # [B, H, 1, D]
    k = rope.apply(attn._heads(attn.k_proj(x), kv), cos, sin)  # [B, KV, 1, D]
    v = attn._heads(attn.v_proj(x), kv)
    q = q.reshape([0, kv, g, d])  # the G query heads of a kv head are the rows of one matmul
    scale = d ** -0.5
    scores_past = paddle.matmul(q, past_k, transpose_y=True) * scale  # [B, KV, G, T]
    scores_new = paddle.matmul(q, k, transpose_y=True) * scale  # [B, KV, G, 1]
    probs = F.softmax(paddle.concat([scores_past, scores_new], axis=-1) + bias, axis=-1)
    ctx = paddle.matmul(probs[:, :, :, :-1], past_v) + probs[:, :, :, -1:] * v  # [B, KV, G, D]
    out = attn.o_proj(ctx.reshape([0, 1, attn.num_heads * d]))  # kv-head-major = query-head order
    return out, k, v


class DecodeProgram(nn.Layer):
    """One decode step: logits and the new key/value column of every layer."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    @paddle.jit.not_to_static  # traced, not transpiled (see PrefillProgram.forward)
    def forward(self, input_ids, position_ids, attention_mask, past):
        m = self.m
        bias = mask_bias(attention_mask, 1).squeeze(2)  # [B, 1, 1, T+1]: broadcast over KV and G
        cos, sin = m.rotary(position_ids)
        x = m.embed_tokens(input_ids)  # [B, 1, H]
        news = []
        for i, layer in enumerate(m.layers):
            attn, k, v = step_attention(layer.self_attn, layer.input_layernorm(x), m.rotary, cos, sin, bias,
                                        past[2 * i], past[2 * i + 1])
            x = x + attn
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            news += [k, v]
        return [m.logits(m.norm(x[:, -1])), *news]


def _specs(cfg, decode: bool):
    s = 1 if decode else None
    specs = [InputSpec([None, s], "int64", INPUT_IDS), InputSpec([None, s], "int64", POSITION_IDS),
             InputSpec([None, None], "float32", ATTENTION_MASK)]
    if decode:
        kvd = [None, cfg.num_key_value_heads, None, cfg.dim_per_head]
        specs.append([InputSpec(kvd, "float32", n) for n in past_names(cfg.num_hidden_layers)])
    return specs


def rename_outputs(program_file: Path, names: list[str]) -> None:
    """Give a saved program's fetch targets `names`, in fetch order (the variables are renamed in
    every op that reads or writes them)."""
    desc = framework_pb2.ProgramDesc.FromString(program_file.read_bytes())
    old = fetch_names(desc)
    assert len(old) == len(names), f"{program_file}: {len(old)} outputs, {len(names)} names"
    existing = {v.name for b in desc.blocks for v in b.vars}
    clash = (set(names) & existing) - set(old)
    assert not clash, f"{program_file}: output names {sorted(clash)} are already variables"
    rename_variables(desc, dict(zip(old, names)))
    program_file.write_bytes(desc.SerializeToString())


def fetch_names(desc) -> list[str]:
    """The fetch targets of a ProgramDesc, in fetch order."""
    fetch = sorted((op for op in desc.blocks[0].ops if op.type == "fetch"),
                   key=lambda op: next(a.i for a in op.attrs if a.name == "col"))
    return [next(i for i in op.inputs if i.parameter == "X").arguments[0] for op in fetch]


def rename_variables(desc, mapping: dict[str, str]) -> None:
    """Rename variables of a ProgramDesc everywhere: their declarations and every op slot."""
    for b in desc.blocks:
        for v in b.vars:
            v.name = mapping.get(v.name, v.name)
        for op in b.ops:
            for slot in (*op.inputs, *op.outputs):
                slot.arguments[:] = [mapping.get(a, a) for a in slot.arguments]


@contextmanager
def _no_source_lookups_in_operator_warnings():
    """Paddle 2.6's static-graph `a + b` (math_op_patch) calls `inspect.stack()`, which reads the
    source of every frame on the stack, to word a DeprecationWarning each time the right operand's
    first dim is dynamic: 15 s of SmolLM2's 60 s conversion. While tracing, that module's
    `inspect.stack` answers without reading files (the warning then names `<traced>:0`)."""
    from paddle.base.layers import math_op_patch

    real = math_op_patch.inspect
    math_op_patch.inspect = SimpleNamespace(stack=lambda *a, **k: [None, (None, "<traced>", 0)])
    try:
        yield
    finally:
        math_op_patch.inspect = real


def _save(layer, specs, prefix: Path, outputs: list[str]) -> None:
    with _no_source_lookups_in_operator_warnings():
        static = paddle.jit.to_static(layer, input_spec=specs, full_graph=True)
        paddle.jit.save(static, str(prefix))
    rename_outputs(prefix.with_suffix(".pdmodel"), outputs)


def write_decoder_programs(model, out_dir: Path) -> dict:
    """Export `model` (a DecoderForCausalLM in eval mode) into `out_dir` as prefill.pdmodel,
    decode.pdmodel and the one decoder.pdiparams both read; returns the file sizes in bytes."""
    assert not model.training, "export a model in eval mode"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = model.cfg.num_hidden_layers
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp = Path(tmp)
        _save(PrefillProgram(model), _specs(model.cfg, decode=False), tmp / "prefill", prefill_io(n)[1])
        _save(DecodeProgram(model), _specs(model.cfg, decode=True), tmp / "decode", decode_io(n)[1])
        a, b = tmp / "prefill.pdiparams", tmp / "decode.pdiparams"
        if a.stat().st_size != b.stat().st_size or sha256_file(a) != sha256_file(b):
            raise AssertionError("the prefill and decode programs' params files differ: "
                                 "they were traced from the same module and must hold the same weights")
        shutil.move(str(tmp / "prefill.pdmodel"), out_dir / PREFILL_PROGRAM)
        shutil.move(str(tmp / "decode.pdmodel"), out_dir / DECODE_PROGRAM)
        shutil.move(str(a), out_dir / PARAMS_FILE)
    return {f: (out_dir / f).stat().st_size for f in (PREFILL_PROGRAM, DECODE_PROGRAM, PARAMS_FILE)}
