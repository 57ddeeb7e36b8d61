"""The predictor's Config: what the CPU path builds, and the GPU path's plan (the GPU cannot run
here: the CPU build refuses TensorRT calls, so the plan is checked as data and the part the CPU
build accepts is applied to a real Config)."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.modeldir import load_model_info
from pipeline.predictor import (
    INPUT_NAMES,
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


def test_tensorrt_varlen_plan_shape_ranges(info):
    from paddle.inference import PrecisionType

    s = PredictorSettings(device="gpu", precision="fp16", tensorrt=True, trt_varlen=True, trt_max_batch=32,
                          trt_max_seq_len=1000)
    calls = {n: (a, k) for n, a, k in gpu_config_calls(info, s)}
    trt = calls["enable_tensorrt_engine"][1]
    assert trt["precision_mode"] == PrecisionType.Half and trt["max_batch_size"] == 32 and not trt["use_calib_mode"]
    lo, hi, opt = calls["set_trt_dynamic_shape_info"][0]
    assert set(lo) == set(hi) == set(opt) == set(INPUT_NAMES)
    assert all(lo[n] == [1, 1] for n in INPUT_NAMES)
    # the longest shape is capped by the model's position embeddings
    assert all(hi[n] == [32, info.max_position_embeddings] for n in INPUT_NAMES)
    assert all(opt[n] == [32, 128] for n in INPUT_NAMES)
    assert "enable_tensorrt_varseqlen" in calls


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

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
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
