"""The fused GPU export of a decoder (convert/decoder_fused.py), checked on the CPU build: the
weight mapping against the CPU decoder (numerically, through a numpy copy of the op's documented
computation), the rotary table, and the exported programs (op, attributes, cache inputs). The
fused op itself has no kernel here and is never run."""

import zlib  # noqa: F401 - before paddle

import json

import numpy as np
import paddle
import pytest
from paddle.base.proto import framework_pb2

from pipeline.convert import decoder_fused as fz
from pipeline.convert.decoder import DecoderConfig, DecoderForCausalLM, RotaryEmbedding
from pipeline.engine.decoder_io import DECODE_PROGRAM, PARAMS_FILE, PREFILL_PROGRAM, program_io_shapes
from tests.convert.test_decoder import TINY

# Paddle 2.6.2's op maker declares exactly these attributes (read from the paddlepaddle-gpu 2.6.2
# libpaddle.so); writing any other one would fail its checker when a GPU predictor loads.
OP_ATTRS_2_6 = {"pre_layer_norm", "epsilon", "dropout_rate", "rotary_emb_dims", "is_test",
                "dropout_implementation", "act_method", "trans_qkvw", "ring_id"}


def _model(seed: int, **over):
    cfg = DecoderConfig(**{**TINY, **over})
    model = DecoderForCausalLM(cfg)
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        base = 1.0 if p.ndim == 1 else 0.0
        p.set_value((base + rng.standard_normal(p.shape) * (0.1 if p.ndim == 1 else 0.05)).astype("float32"))
    model.eval()
    return model, {n: p.numpy() for n, p in model.named_parameters()}


def _batch():
    ids = np.array([[0, 0, 0, 5, 6, 7], [11, 12, 13, 14, 15, 16], [0, 9, 8, 7, 6, 5]], np.int64)
    mask = (np.arange(6)[None] >= np.array([3, 0, 1])[:, None]).astype(np.int64)
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None) * mask
    return ids, mask, pos


@pytest.mark.parametrize("over", [
    {},  # Llama: rotate_half, GQA 4 query / 2 kv heads, untied
    {"tie_word_embeddings": True, "rope_interleaved": True, "attention_bias": True, "mlp_bias": True},  # ERNIE 4.5-like
])
def test_mapping_equals_the_cpu_decoder(over):
    """Prefill and 3 decode steps: the mapped weights through the op's computation (numpy, float64)
    give the CPU decoder's logits within 1e-5 (float32 model)."""
    model, w = _model(1, **over)
    layout = fz.FusedLayout.of(model.cfg)
    mapped = fz.fused_weights(model.cfg, w, "float32")
    ids, mask, pos = _batch()
    caches = fz.new_caches(layout, 3, 10)
    with paddle.no_grad():
        want, cache = model(paddle.to_tensor(ids), paddle.to_tensor(pos), paddle.to_tensor(mask))
        got = fz.reference_prefill(mapped, layout, ids, pos, mask, caches)
        np.testing.assert_allclose(got, want.numpy()[:, -1], atol=1e-5, rtol=0)
        want = want.numpy()[:, -1]
        next_pos = pos[:, -1:] + 1
        for _ in range(3):
            tok = want.argmax(-1)[:, None]
            t = mask.shape[1]
            mask = np.concatenate([mask, np.ones_like(tok)], 1)
            want, cache = model(paddle.to_tensor(tok), paddle.to_tensor(next_pos), paddle.to_tensor(mask), cache)
            want = want.numpy()[:, -1]
            got = fz.reference_step(mapped, layout, tok, next_pos, mask, caches, t)
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            next_pos = next_pos + 1


def test_without_the_rotary_permutation_the_mapping_is_wrong():
    """The reference is sensitive to the q/k row order: the mapping above checks something."""
    model, w = _model(2)
    layout = fz.FusedLayout.of(model.cfg)
    ids, mask, pos = _batch()
    wrong = fz.fused_weights(DecoderConfig(**{**TINY, "rope_interleaved": True}), w, "float32")
    with paddle.no_grad():
        want = model(paddle.to_tensor(ids), paddle.to_tensor(pos), paddle.to_tensor(mask))[0].numpy()[:, -1]
    got = fz.reference_prefill(wrong, layout, ids, pos, mask, fz.new_caches(layout, 3, 6))
    assert np.abs(got - want).max() > 1e-2


def test_weight_layout_and_dtypes():
    model, w = _model(3)
    cfg = model.cfg
    H, n, kv, d, F = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head, cfg.intermediate_size
    m = fz.fused_weights(cfg, w, "float16")
    i = 1
    shapes = {k[len(f"fmt_{i}_"):]: v.shape for k, v in m.items() if k.startswith(f"fmt_{i}_")}
    assert shapes == {"ln_scale": (2 * H,), "ln_bias": (2 * H,), "qkv_w": (3, n, d, 2 * H), "qkv_b": (3, n, d),
                      "out_w": (n * d, 2 * H), "out_b": (2 * H,), "ffn_ln_scale": (2 * H,), "ffn_ln_bias": (2 * H,),
                      "ffn1_w": (2 * H, fz.ZERO_FFN), "ffn1_b": (fz.ZERO_FFN,), "ffn2_w": (fz.ZERO_FFN, 2 * H),
                      "ffn2_b": (2 * H,)}
    assert m[f"mlp_{i}_ffn1_w"].shape == (H, 2 * F) and m[f"mlp_{i}_ffn2_w"].shape == (F, H)
    norms = [k for k in m if "ln_" in k or k.endswith("_norm") or k == "final_norm"]
    assert norms and all(m[k].dtype == np.float32 for k in norms)  # the op reads norm params as float32
    assert all(m[k].dtype == np.float16 for k in m if k not in norms)

    f32 = fz.fused_weights(cfg, w, "float32")
    perm = fz.interleave_permutation(d)
    p = f"layers.{i}."
    q = w[p + "self_attn.q_proj.weight"].T.reshape(n, d, H)[:, perm]
    k = w[p + "self_attn.k_proj.weight"].T.reshape(kv, d, H)[:, perm]
    v = w[p + "self_attn.v_proj.weight"].T.reshape(kv, d, H)
    qkv = f32[f"fmt_{i}_qkv_w"]
    np.testing.assert_array_equal(qkv[0, :, :, :H], q)
    for h in range(n):  # query head h reads kv head h // groups
        np.testing.assert_array_equal(qkv[1, h, :, :H], k[h // (n // kv)])
        np.testing.assert_array_equal(qkv[2, h, :, :H], v[h // (n // kv)])
    assert not qkv[..., H:].any()  # the mirrored half is never read
    o = w[p + "self_attn.o_proj.weight"]
    np.testing.assert_array_equal(f32[f"fmt_{i}_out_w"], np.concatenate([o, -o], 1))
    np.testing.assert_array_equal(f32[f"mlp_{i}_ffn1_w"], np.concatenate(
        [w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]], 1))
    g = w[p + "input_layernorm.weight"]
    np.testing.assert_array_equal(f32[f"fmt_{i}_ln_scale"], np.concatenate([g, g]))
    assert not f32[f"fmt_{i}_ffn1_w"].any() and not f32[f"fmt_{i}_ffn2_w"].any()


def test_rotary_table_matches_the_cpu_decoder():
    """The op's [2, B, 1, S, D] table equals the CPU decoder's interleaved cos/sin, and the CPU
    rotate_half table permuted by the q/k row permutation."""
    pos = np.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]], np.int64)
    layout = fz.FusedLayout.of(DecoderConfig(**TINY))
    table = fz.rotary_embs(layout, pos)
    assert table.shape == (2, 2, 1, 5, layout.head_dim)
    inter = RotaryEmbedding(DecoderConfig(**{**TINY, "rope_interleaved": True}))
    half = RotaryEmbedding(DecoderConfig(**TINY))
    cos, sin = (t.numpy() for t in inter(paddle.to_tensor(pos)))  # [B, 1, S, D]
    np.testing.assert_allclose(table[0], cos, atol=1e-6)
    np.testing.assert_allclose(table[1], sin, atol=1e-6)
    perm = fz.interleave_permutation(layout.head_dim)
    cos_h, sin_h = (t.numpy() for t in half(paddle.to_tensor(pos)))
    np.testing.assert_allclose(table[0], cos_h[..., perm], atol=1e-6)
    np.testing.assert_allclose(table[1], sin_h[..., perm], atol=1e-6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, w = _model(4)
    out = tmp_path_factory.mktemp("fused")
    arrays = fz.fused_weights(model.cfg, w, "float16")
    fz.write_fused_programs(model.cfg, arrays, out, max_len=40)
    return model.cfg, arrays, out


def _ops(program):
    desc = framework_pb2.ProgramDesc.FromString(program.read_bytes())
    return desc.blocks[0], [op for op in desc.blocks[0].ops]


def _attrs(op):
    out = {}
    for a in op.attrs:
        out[a.name] = {framework_pb2.BOOLEAN: a.b, framework_pb2.INT: a.i, framework_pb2.FLOAT: a.f,
                       framework_pb2.STRING: a.s}[a.type]
    return out


@pytest.mark.parametrize("program,decode", [(PREFILL_PROGRAM, False), (DECODE_PROGRAM, True)])
def test_exported_program_holds_the_fused_op(exported, program, decode):
    cfg, arrays, out = exported
    block, ops = _ops(out / program)
    fused = [op for op in ops if op.type == fz.FUSED_OP]
    assert len(fused) == cfg.num_hidden_layers
    assert not any(op.type == "assign" for op in ops), "a stand-in was left in the program"
    names = {v.name: v for v in block.vars}
    for i, op in enumerate(fused):
        attrs = _attrs(op)
        assert set(attrs) == OP_ATTRS_2_6
        assert attrs["pre_layer_norm"] and attrs["trans_qkvw"] and attrs["is_test"]
        assert attrs["rotary_emb_dims"] == 1 and attrs["act_method"] == "gelu" and attrs["dropout_rate"] == 0.0
        assert abs(attrs["epsilon"] - cfg.rms_norm_eps) < 1e-9
        slots = {s.parameter: list(s.arguments) for s in op.inputs}
        outs = {s.parameter: list(s.arguments) for s in op.outputs}
        assert slots["CacheKV"] == [f"cache_kv_{i}"] and outs["CacheKVOut"] == slots["CacheKV"]  # in place
        assert ("TimeStep" in slots) == decode and slots.get("TimeStep", [fz.TIME_STEP]) == [fz.TIME_STEP]
        assert slots["QKVW"] == [f"fmt_{i}_qkv_w"] and slots["FFN2Weight"] == [f"fmt_{i}_ffn2_w"]
        for args in slots.values():
            assert all(a in names for a in args), args
    io = program_io_shapes(out / program)
    feeds = [a for op in ops if op.type == "feed" for s in op.outputs for a in s.arguments]
    want = fz.fused_decode_inputs(cfg.num_hidden_layers) if decode else fz.fused_prefill_inputs(cfg.num_hidden_layers)
    assert feeds == want
    assert io["cache_kv_0"] == [2, -1, cfg.num_attention_heads, -1, cfg.dim_per_head]  # kv heads repeated
    assert names["cache_kv_0"].type.lod_tensor.tensor.data_type == framework_pb2.VarType.FP16
    assert io["logits"] == [-1, cfg.vocab_size]
    assert names["logits"].type.lod_tensor.tensor.data_type == framework_pb2.VarType.FP32
    persist = {v.name for v in block.vars if v.persistable} - {"feed", "fetch"}
    assert persist == set(arrays)


def test_params_file_reads_back_in_the_programs_order(exported):
    _, arrays, out = exported
    for program in (PREFILL_PROGRAM, DECODE_PROGRAM):
        back = fz.load_params(out / program, out / PARAMS_FILE)
        assert set(back) == set(arrays)
        for name, a in arrays.items():
            assert back[name].dtype == a.dtype
            np.testing.assert_array_equal(back[name], a)


def test_convert_target_gpu_writes_a_fused_directory(tiny_decoder_dir, tmp_path):
    """`convert tiny.gguf DIR --target gpu`: a generation directory marked fused fp16, with the
    mapping's check recorded."""
    from pipeline.cli import main
    from pipeline.engine.modeldir import load_model_info

    src = tiny_decoder_dir.parent / "tiny.gguf"
    assert main(["convert", str(src), str(tmp_path / "gpu"), "--target", "gpu", "--max-seq-len", "128"]) == 0
    info = load_model_info(tmp_path / "gpu")
    meta = json.loads((tmp_path / "gpu" / "model.json").read_text())
    assert meta["runtime"] == fz.FUSED_RUNTIME and info.precision == "fp16" and meta["fused"]["max_len"] == 128
    assert meta["validation"]["max_abs_logit_diff"] < fz.FUSED_PROBE_ATOL
    block, ops = _ops(tmp_path / "gpu" / DECODE_PROGRAM)
    assert sum(op.type == fz.FUSED_OP for op in ops) == info.num_hidden_layers


@pytest.mark.parametrize("decode", [False, True])
def test_program_computes_the_rotary_table_and_mask_the_op_expects(decode):
    """The float32 program with its stand-ins (identities) runs on the CPU: the rotary input and
    the mask it hands every fused op equal `rotary_embs` and the reference's additive mask, and
    with attention left out (the stand-in passes the mirrored stream through) the ops around the
    fused op (mirror, slice, SwiGLU MLP, final norm, tied/untied head) equal the numpy reference's."""
    model, w = _model(5)
    layout = fz.FusedLayout.of(model.cfg)
    arrays = fz.fused_weights(model.cfg, w, "float32")
    ids, mask, pos = _batch()
    if decode:
        ids, pos = ids[:, -1:], pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)
    paddle.enable_static()
    try:
        main, b, inputs, logits_name = fz.build_static(layout, fz._param_shapes(arrays), 40, decode, "float32")
        scope = paddle.static.global_scope().new_scope()
        for n, a in arrays.items():
            scope.var(n).get_tensor().set(a, paddle.CPUPlace())
        feed = {"input_ids": ids, "position_ids": pos, "attention_mask": mask.astype(np.float32)}
        if decode:
            feed["time_step"] = np.array([mask.shape[1] - 1], np.int32)
        for i in range(layout.layers):
            feed[f"cache_kv_{i}"] = np.zeros(layout.cache_shape(3, 40), np.float32)
        slots = b.stand_ins[0][2]
        rope, bias, logits = paddle.static.Executor(paddle.CPUPlace()).run(
            main, feed=feed, fetch_list=[slots["RotaryPosEmb"][0], slots["SrcMask"][0], logits_name], scope=scope)
    finally:
        paddle.disable_static()
    np.testing.assert_allclose(rope, fz.rotary_embs(layout, pos), atol=1e-5)
    if decode:
        want = np.where(mask > 0, 0.0, fz.FUSED_MASK_VALUE)[:, None, None, :]
    else:
        S = ids.shape[1]
        visible = np.tril(np.ones((S, S), bool))[None] & (mask[:, None, :] > 0)
        want = np.where(visible, 0.0, fz.FUSED_MASK_VALUE)[:, None]
    np.testing.assert_array_equal(bias, want)
    w64 = {k: v.astype(np.float64) for k, v in arrays.items()}
    x = w64["embed_tokens"][ids]
    for i in range(layout.layers):
        x = fz._outside_mlp(w64, i, layout, x)
    want_logits = fz._rms(x[:, -1], w64["final_norm"], layout.eps) @ w64["lm_head"]
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
