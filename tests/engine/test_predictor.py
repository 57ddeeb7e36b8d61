"""The predictor's Config: what the CPU path builds, and the GPU path's plan (the GPU cannot run
here: the CPU build refuses TensorRT calls, so the plan is checked as data and the part the CPU
build accepts is applied to a real Config)."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.engine.modeldir import ENCODER_INPUTS as INPUT_NAMES, load_model_info
from pipeline.engine.predictor import (
    GpuUnavailable,
    PaddlePredictor,
    PredictorSettings,
    build_config,
    gpu_available,
    gpu_config_calls,
)


@pytest.fixture(scope="module")
def info(tiny_bi_dir):
    return load_model_info(tiny_bi_dir)


def test_cpu_config_uses_onednn_ir_optim_and_threads(info):
    c = build_config(info, PredictorSettings(threads=2))
    assert c.mkldnn_enabled() and c.ir_optim() and not c.use_gpu()
    assert c.cpu_math_library_num_threads() == 2
    assert not c.use_feed_fetch_ops_enabled()


def test_gpu_fp16_plan_keeps_layernorm_and_softmax_in_fp32(info):
    from paddle.inference import PrecisionType

    calls = dict((n, (a, k)) for n, a, k in gpu_config_calls(info, PredictorSettings(device="gpu", precision="fp16")))
    assert calls["enable_use_gpu"][0][2] == PrecisionType.Half
    assert calls["exp_disable_mixed_precision_ops"][0][0] == {"layer_norm", "softmax"}
    assert "enable_tensorrt_engine" not in calls
    # the part the CPU build accepts, applied to a real Config
    c = build_config(info, PredictorSettings(device="gpu", precision="fp16"))
    assert c.ir_optim()  # (use_gpu() stays False on a CPU build, see paddle-cpu-notes)


def test_gpu_fp32_plan_has_no_mixed_precision(info):
    names = [n for n, _, _ in gpu_config_calls(info, PredictorSettings(device="gpu"))]
    assert names == ["enable_use_gpu"]


def test_tensorrt_plan_shape_ranges(info):
    from paddle.inference import PrecisionType

    s = PredictorSettings(device="gpu", precision="fp16", tensorrt=True, trt_max_batch=32, trt_max_seq_len=1000)
    calls = {n: (a, k) for n, a, k in gpu_config_calls(info, s)}
    trt = calls["enable_tensorrt_engine"][1]
    assert trt["precision_mode"] == PrecisionType.Half and trt["max_batch_size"] == 32 and not trt["use_calib_mode"]
    lo, hi, opt = calls["set_trt_dynamic_shape_info"][0]
    assert set(lo) == set(hi) == set(opt) == set(INPUT_NAMES)
    assert all(lo[n] == [1, 1] for n in INPUT_NAMES)
    # the longest shape is capped by the model's position embeddings
    assert all(hi[n] == [32, info.max_position_embeddings] for n in INPUT_NAMES)
    assert all(opt[n] == [32, 128] for n in INPUT_NAMES)
    assert "enable_tensorrt_varseqlen" not in calls


def test_tensorrt_varlen_plan_names_the_position_ids_and_mask(info, both_layouts):
    """Variable length needs the `--target gpu` export (position ids as an input) and names it
    and the mask for Paddle's remove-padding pass; the CPU export is refused with what to do."""
    from paddle import inference as paddle_infer

    from pipeline.engine.modeldir import POSITION_IDS
    from pipeline.engine.predictor import apply_call

    s = PredictorSettings(device="gpu", precision="fp16", tensorrt=True, trt_varlen=True, trt_max_batch=32)
    _, gpu = both_layouts
    plan = gpu_config_calls(gpu, s)
    calls = {n: (a, k) for n, a, k in plan}
    assert "enable_tensorrt_varseqlen" in calls
    assert calls["InternalUtils.set_transformer_posid"][0] == (POSITION_IDS,)
    assert calls["InternalUtils.set_transformer_maskid"][0] == ("attention_mask",)
    lo, hi, opt = calls["set_trt_dynamic_shape_info"][0]
    assert set(lo) == set(hi) == set(opt) == set(INPUT_NAMES) | {POSITION_IDS}
    c = paddle_infer.Config(str(gpu.program_file), str(gpu.params_file))
    for name, args, kwargs in plan:  # what the CPU build accepts really applies
        if name.startswith("InternalUtils."):
            apply_call(c, name, args, kwargs)
    with pytest.raises(GpuUnavailable, match="--target gpu"):
        gpu_config_calls(info, s)


@pytest.mark.parametrize("kwargs", [dict(precision="fp16"), dict(tensorrt=True), dict(device="gpu", trt_varlen=True),
                                    dict(device="gpu", tensorrt=True, trt_varlen=True)])
def test_impossible_predictor_settings_are_refused(kwargs):
    with pytest.raises(AssertionError):
        PredictorSettings(**kwargs)


@pytest.mark.skipif(gpu_available(), reason="this machine has a GPU build")
def test_gpu_on_a_cpu_install_says_what_is_missing(info):
    with pytest.raises(GpuUnavailable, match="requirements-gpu.txt"):
        PaddlePredictor(info, PredictorSettings(device="gpu"))


def test_predictor_runs_and_checks_shapes(info):
    p = PaddlePredictor(info)
    ids = np.ones((2, 5), np.int64)
    out = p.run(ids, np.zeros_like(ids), np.ones((2, 5), np.float32))
    assert out.shape == (2, 32) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    with pytest.raises(AssertionError, match="share one"):
        p.run(ids, np.zeros((2, 4), np.int64), np.ones((2, 5), np.float32))


def test_streams_share_weights_and_give_the_single_predictor_outputs(info):
    import threading

    single = PaddlePredictor(info, PredictorSettings(threads=1))
    multi = PaddlePredictor(info, PredictorSettings(threads=1, streams=3))
    assert multi.concurrency == 3
    rng = np.random.default_rng(1)
    batches = [rng.integers(5, 100, size=(4, n)).astype(np.int64) for n in (3, 9, 17, 9, 3, 30)]
    want = [single.run(b, np.zeros_like(b), np.ones(b.shape, np.float32)) for b in batches]
    got = [None] * len(batches)

    def work(k):
        for i in range(k, len(batches), 3):
            got[i] = multi.run(batches[i], np.zeros_like(batches[i]), np.ones(batches[i].shape, np.float32))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w, g in zip(want, got):
        assert np.array_equal(w, g)


def test_attention_transposes_fold_into_the_matmuls(info, tmp_path):
    """The exported program gives transpose2 its XShape, so oneDNN folds the attention output's
    transpose + reshape into the matmul: none may be left in the optimised program (the check
    fails on a program exported without `add_transpose_xshape`)."""
    import sys
    from collections import Counter

    from paddle.base.proto import framework_pb2

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from show_program_ops import op_counts

    exported = framework_pb2.ProgramDesc.FromString(info.program_file.read_bytes())
    transposes = [op for op in exported.blocks[0].ops if op.type == "transpose2"]
    assert transposes and all(any(o.parameter == "XShape" for o in op.outputs) for op in transposes)
    p = PaddlePredictor(info, PredictorSettings(threads=1, save_optimized_program_to=str(tmp_path)))
    ids = np.ones((2, 5), np.int64)
    p.run(ids, np.zeros_like(ids), np.ones((2, 5), np.float32))
    ops: Counter = op_counts(tmp_path / "_optimized.pdmodel")
    layers = info.num_hidden_layers
    assert ops["transpose2"] == 0 and ops["reshape2"] == 0, ops
    assert ops["fc"] == 4 * layers and ops["fused_matmul"] == 2 * layers, ops
    assert ops["dropout"] == 0, ops


# ----------------------------------------------------------------- GPU export (separate q/k/v)

# Paddle 2.6's GpuPassStrategy (paddle/fluid/inference/api/paddle_pass_builder.cc, Linux), in order.
# The CPU build registers most of it; `_registered_gpu_passes` keeps those it can run.
PADDLE_GPU_PASSES = [
    "map_op_to_another_pass", "is_test_pass", "simplify_with_basic_ops_pass",
    "delete_quant_dequant_linear_op_pass", "delete_weight_dequant_linear_op_pass", "sparse_conv_optim_pass",
    "constant_folding_pass", "silu_fuse_pass", "conv_bn_fuse_pass", "conv_eltwiseadd_bn_fuse_pass",
    "embedding_eltwise_layernorm_fuse_pass", "multihead_matmul_fuse_pass_v2", "vit_attention_fuse_pass",
    "fused_multi_transformer_encoder_pass", "fused_multi_transformer_decoder_pass",
    "fused_multi_transformer_encoder_fuse_qkv_pass", "fused_multi_transformer_decoder_fuse_qkv_pass",
    "multi_devices_fused_multi_transformer_encoder_pass",
    "multi_devices_fused_multi_transformer_encoder_fuse_qkv_pass",
    "multi_devices_fused_multi_transformer_decoder_fuse_qkv_pass", "fuse_multi_transformer_layer_pass",
    "gpu_cpu_squeeze2_matmul_fuse_pass", "gpu_cpu_reshape2_matmul_fuse_pass", "gpu_cpu_flatten2_matmul_fuse_pass",
    "gpu_cpu_map_matmul_v2_to_mul_pass", "gpu_cpu_map_matmul_v2_to_matmul_pass", "matmul_scale_fuse_pass",
    "multihead_matmul_fuse_pass_v3", "gpu_cpu_map_matmul_to_mul_pass", "fc_fuse_pass",
    "fc_elementwise_layernorm_fuse_pass", "conv_elementwise_add_act_fuse_pass",
    "conv_elementwise_add2_act_fuse_pass", "conv_elementwise_add_fuse_pass", "transpose_flatten_concat_fuse_pass",
    "transfer_layout_pass", "transfer_layout_elim_pass", "auto_mixed_precision_pass", "identity_op_clean_pass",
    "inplace_op_var_pass",
]
# Registered in the CPU build but its pattern detector segfaults there (it runs after the attention
# fusion, so leaving it out does not change what this checks).
CPU_BUILD_CRASHES = {"fc_elementwise_layernorm_fuse_pass"}


def _registered_gpu_passes() -> list[str]:
    from paddle.base import core

    def registered(name):
        try:
            core.get_pass(name)
            return True
        except Exception:  # noqa: BLE001 - paddle raises a plain ValueError/RuntimeError
            return False

    return [p for p in PADDLE_GPU_PASSES if p not in CPU_BUILD_CRASHES and registered(p)]


def _ops_after_passes(model_dir: Path, passes: list[str], out: Path):
    """Op counts of the program Paddle Inference builds with exactly `passes` (CPU build)."""
    import sys

    from paddle import inference as paddle_infer

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from show_program_ops import op_counts

    c = paddle_infer.Config(str(model_dir / "inference.pdmodel"), str(model_dir / "inference.pdiparams"))
    c.disable_gpu()
    c.switch_ir_optim(True)
    c.pass_builder().set_passes(passes)
    c.enable_save_optim_model(True)
    c.set_optim_cache_dir(str(out))
    c.switch_use_feed_fetch_ops(False)
    c.disable_glog_info()
    paddle_infer.create_predictor(c)
    return op_counts(out / "_optimized.pdmodel")


@pytest.fixture(scope="module")
def both_layouts(tmp_path_factory, minilm_src):
    """One tiny checkpoint (3 layers) converted for the CPU (fused QKV) and for the GPU (separate q/k/v)."""
    from pipeline.convert import convert
    from tests.conftest import write_hf_checkpoint

    root = tmp_path_factory.mktemp("layouts")
    src = write_hf_checkpoint(root / "ckpt", minilm_src / "vocab.txt", layers=3, num_labels=1, seed=5)
    return (load_model_info(convert(src, root / "cpu")),
            load_model_info(convert(src, root / "gpu", target="gpu")))


def test_gpu_export_records_its_layout_and_gives_the_cpu_export_outputs(both_layouts):
    from pipeline.convert.export import probe_batch
    from pipeline.engine.predictor import attention_fusable

    from paddle import inference as paddle_infer

    cpu, gpu = both_layouts
    assert cpu.attention == "fused_qkv" and cpu.architecture["fused_qkv"] is True
    assert gpu.attention == "separate_qkv" and gpu.architecture["fused_qkv"] is False
    assert gpu.inputs == ("input_ids", "token_type_ids", "attention_mask", "position_ids")
    # the GPU export takes the position ids (the predictor feeds them; padding rows included below)
    names = lambda i: paddle_infer.create_predictor(paddle_infer.Config(str(i.program_file), str(i.params_file)))\
        .get_input_names()  # noqa: E731
    assert names(cpu) == list(INPUT_NAMES) and names(gpu) == list(INPUT_NAMES) + ["position_ids"]
    assert not attention_fusable(cpu) and attention_fusable(gpu)
    rng = np.random.default_rng(2)
    ids = rng.integers(5, 1000, size=(6, 40)).astype(np.int64)
    mask = np.ones(ids.shape, np.float32)
    mask[1, 7:] = mask[4, 30:] = 0
    types = np.zeros_like(ids)
    types[:, 20:] = 1
    batches = [probe_batch(cpu.vocab_size), dict(input_ids=ids, token_type_ids=types, attention_mask=mask)]
    for settings in (PredictorSettings(threads=1), PredictorSettings(threads=1, onednn=False)):
        a, b = PaddlePredictor(cpu, settings), PaddlePredictor(gpu, settings)
        for batch in batches:
            want, got = a.run(**batch), b.run(**batch)
            assert np.std(want) > 1e-3 and np.max(np.abs(got - want)) < 1e-5


def test_gpu_pass_list_fuses_the_attention_of_the_gpu_export_only(both_layouts, tmp_path):
    """Paddle 2.6's GPU pass list (the part the CPU build registers), run on the CPU build:
    `multihead_matmul` replaces every layer's attention in the GPU export and none in the CPU
    export (its one QKV projection + split does not match the pattern)."""
    cpu, gpu = both_layouts
    passes = _registered_gpu_passes()
    assert "multihead_matmul_fuse_pass_v2" in passes and "multihead_matmul_fuse_pass_v3" in passes
    layers = gpu.num_hidden_layers
    ops_gpu = _ops_after_passes(gpu.path, passes, tmp_path / "gpu")
    assert ops_gpu["multihead_matmul"] == layers, ops_gpu
    assert ops_gpu["softmax"] == 0 and ops_gpu["transpose2"] == 0, ops_gpu
    ops_cpu = _ops_after_passes(cpu.path, passes, tmp_path / "cpu")
    assert ops_cpu["multihead_matmul"] == 0 and ops_cpu["softmax"] == layers, ops_cpu
    # v2 on its own once matmul_v2 is mapped (the pattern: scale on the q branch before QK^T)
    v2 = ["is_test_pass", "gpu_cpu_map_matmul_v2_to_mul_pass", "gpu_cpu_map_matmul_v2_to_matmul_pass",
          "multihead_matmul_fuse_pass_v2"]
    assert _ops_after_passes(gpu.path, v2, tmp_path / "v2")["multihead_matmul"] == layers


def test_cpu_export_keeps_its_onednn_program(both_layouts, tmp_path):
    """The GPU layout is opt-in: the default export's oneDNN program is the fused-QKV one
    (one fc per layer for q, k, v together), the GPU export has three."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from show_program_ops import op_counts

    cpu, gpu = both_layouts
    layers = cpu.num_hidden_layers
    counts = {}
    for info in (cpu, gpu):
        out = tmp_path / info.path.name
        p = PaddlePredictor(info, PredictorSettings(threads=1, save_optimized_program_to=str(out)))
        ids = np.ones((2, 5), np.int64)
        p.run(ids, np.zeros_like(ids), np.ones((2, 5), np.float32))
        counts[info.path.name] = op_counts(out / "_optimized.pdmodel")
    assert counts["cpu"]["split"] == layers and counts["cpu"]["fc"] == 4 * layers + 2, counts["cpu"]
    assert counts["cpu"]["transpose2"] == 0 and counts["cpu"]["fused_matmul"] == 2 * layers, counts["cpu"]
    assert counts["gpu"]["split"] == 0 and counts["gpu"]["fc"] == 6 * layers + 2, counts["gpu"]


def test_gpu_config_warns_about_a_cpu_export(both_layouts):
    import warnings

    cpu, gpu = both_layouts
    with pytest.warns(UserWarning, match="--target gpu"):
        build_config(cpu, PredictorSettings(device="gpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_config(gpu, PredictorSettings(device="gpu"))


def test_a_gpu_export_is_not_quantised(both_layouts, tmp_path):
    pytest.importorskip("paddleslim")
    from pipeline.convert import ConversionError
    from pipeline.convert.quantize import quantize

    _, gpu = both_layouts
    with pytest.raises(ConversionError, match="target gpu"):
        quantize(gpu.path, [tmp_path / "unused.tsv"], tmp_path / "int8", log=lambda m: None)
    assert not (tmp_path / "int8").exists()
