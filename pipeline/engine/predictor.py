"""Paddle Inference predictor behind the small `Backend` interface the engine uses.

paddle is imported through `engine/paddle_env.py`, which sets what Paddle needs on this
project's CPUs first (users never have to know): `MKL_DEBUG_CPU_TYPE=5` on AMD CPUs only, zlib
before paddle, and the SIGTERM handler kept across paddle's import.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.engine.paddle_env import import_inference

from pipeline.engine.batching import position_ids
from pipeline.engine.modeldir import POSITION_IDS, ModelInfo

paddle_infer = import_inference()


class GpuUnavailable(RuntimeError):
    """GPU execution was asked for on an install or machine that cannot provide it."""


@dataclass(frozen=True)
class PredictorSettings:
    threads: int = 1  # math threads of each stream
    streams: int = 1  # predictors that run batches concurrently (clones sharing the weights)
    device: str = "cpu"  # 'cpu' | 'gpu'
    precision: str = "fp32"  # 'fp32' | 'bf16' | 'int8' (CPU, oneDNN) | 'fp16' (GPU only: no fp16 kernels on the CPU)
    onednn: bool = True
    ir_optim: bool = True
    onednn_cache_capacity: int = 64  # shapes whose oneDNN primitives are kept; 0: no limit (grows with shapes)
    save_optimized_program_to: str | None = None  # a folder to dump the optimised program into
    gpu_id: int = 0
    gpu_memory_mb: int = 1024  # initial pool; Paddle grows it as needed
    tensorrt: bool = False  # GPU: run supported subgraphs in TensorRT
    trt_varlen: bool = False  # GPU + TensorRT: variable-length ERNIE kernels (fp16 only)
    trt_max_batch: int = 64
    trt_max_seq_len: int = 512
    trt_cache_dir: str | None = None  # serialised engines, so later runs skip the build

    def __post_init__(self) -> None:
        assert self.threads >= 1, f"threads must be >= 1, got {self.threads}"
        assert self.streams >= 1, f"streams must be >= 1, got {self.streams}"
        assert self.device in ("cpu", "gpu"), f"device must be cpu or gpu, got {self.device!r}"
        assert self.precision in ("fp32", "bf16", "int8", "fp16"), f"precision must be fp32, bf16, int8 or fp16, got {self.precision!r}"
        assert self.precision not in ("bf16", "int8") or (self.device == "cpu" and self.onednn), (
            f"{self.precision} runs on the CPU with oneDNN only")
        assert not (self.device == "cpu" and self.precision == "fp16"), "fp16 needs --device gpu"
        assert not (self.tensorrt and self.device != "gpu"), "TensorRT needs --device gpu"
        assert not self.trt_varlen or (self.tensorrt and self.precision == "fp16"), (
            "variable-length TensorRT kernels need --tensorrt and --precision fp16"
        )


def build_config(info: ModelInfo, settings: PredictorSettings) -> paddle_infer.Config:
    """The paddle.inference.Config for a model and settings; separate so tests can inspect it."""
    config = paddle_infer.Config(str(info.program_file), str(info.params_file))
    config.switch_ir_optim(settings.ir_optim)
    if settings.device == "cpu":
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(settings.threads)
        # Reuse intermediate buffers across ops: without it every activation of every layer
        # stays allocated (measured ~10-15% lower peak RSS, identical outputs).
        config.enable_memory_optim()
        if settings.onednn:
            config.enable_mkldnn()
            config.set_mkldnn_cache_capacity(settings.onednn_cache_capacity)
            if info.precision == "int8":
                # Quantised model (`python -m pipeline quantize`): only the listed op types run
                # int8 (oneDNN fc -> gemm_s8s8s32); int8 for every op is ~36x slower here.
                config.enable_mkldnn_int8(set(info.quantization.onednn_int8_ops))
            elif settings.precision == "bf16":
                # Every op oneDNN has a bf16 kernel for (Paddle's default bf16 placement: fc,
                # fused_matmul, softmax, gelu, layer_norm, elementwise_add, ...): measured the
                # fastest on AMX (3.6x fp32 at 2 threads), as accurate as keeping layer norm and
                # softmax fp32 (max |diff| 1.9e-3 on the embeddings), see README "Precision".
                config.enable_mkldnn_bfloat16()
    else:
        _configure_gpu(config, info, settings)
    # Handles are created once and inputs copied in per batch (zero-copy tensors).
    config.switch_use_feed_fetch_ops(False)
    config.switch_specify_input_names(True)
    config.disable_glog_info()
    if settings.save_optimized_program_to:
        config.enable_save_optim_model(True)
        config.set_optim_cache_dir(settings.save_optimized_program_to)
    return config


def gpu_config_calls(info: ModelInfo, settings: PredictorSettings) -> list[tuple[str, tuple, dict]]:
    """The Config calls of the GPU path, as data: (method, args, kwargs) in order.

    GPU: FP16 through Paddle's mixed-precision pass with layer norm and softmax kept in fp32,
    the GPU fusion passes (in the default GPU pass list when IR optimisation is on), and
    optionally TensorRT with dynamic shapes and the variable-length ERNIE plugins. Written against
    Paddle's documented Config API. Kept as data because the CPU build refuses the TensorRT calls,
    so tests check this plan and apply what the CPU build accepts (see README "Verified here and
    not"). A method name starting with "InternalUtils." is a static function of
    `paddle.inference.InternalUtils` that takes the config as its first argument.

    Which export the fusion needs: the multi-head attention fusion (`multihead_matmul_fuse_pass_v2`
    /`_v3`, and TensorRT's `trt_multihead_matmul_fuse_pass_v2`, which the variable-length kernels
    build on) only matches a model converted with `--target gpu` (model.json `"attention":
    "separate_qkv"`: separate q/k/v projections). The default CPU export (`"fused_qkv"`: one QKV
    projection + split) runs correct but unfused attention on a GPU; `attention_fusable` says
    which one a model is, and `_configure_gpu` warns. Checked on the CPU build by running the
    registered part of Paddle 2.6's GPU pass list (tests/test_predictor.py); the embedding + layer
    norm fusion is not registered in the CPU build and is unchecked.

    Variable-length kernels (`--trt-varlen`): Paddle 2.6 removes the padding inside TensorRT
    (remove_padding_recover_padding_pass) when `InternalUtils.set_transformer_posid/maskid` name
    a position-ids input feeding the position embedding and the mask input; it reads each
    sequence's length from the position ids (`batching.position_ids`). The `--target gpu` export
    has that input; the runtime keeps feeding padded batches and Paddle does the rest."""
    half = settings.precision == "fp16"
    precision = paddle_infer.PrecisionType.Half if half else paddle_infer.PrecisionType.Float32
    calls: list[tuple[str, tuple, dict]] = [("enable_use_gpu", (settings.gpu_memory_mb, settings.gpu_id, precision), {})]
    if half:
        # Numerically sensitive reductions stay in fp32 (Paddle's default black list holds
        # them too; saying it here keeps it true whatever the default becomes).
        calls.append(("exp_disable_mixed_precision_ops", ({"layer_norm", "softmax"},), {}))
    if settings.tensorrt:
        calls.append(("enable_tensorrt_engine", (), dict(
            workspace_size=1 << 30, max_batch_size=settings.trt_max_batch, min_subgraph_size=3,
            precision_mode=precision, use_static=settings.trt_cache_dir is not None, use_calib_mode=False)))
        b, s = settings.trt_max_batch, min(settings.trt_max_seq_len, info.max_position_embeddings)
        opt = min(128, s)
        names = info.inputs
        calls.append(("set_trt_dynamic_shape_info", (
            {n: [1, 1] for n in names}, {n: [b, s] for n in names}, {n: [b, opt] for n in names}), {}))
        if settings.trt_varlen:
            if POSITION_IDS not in names:
                raise GpuUnavailable(f"--trt-varlen needs a model with a position-ids input, which {info.path} "
                                     f"lacks: convert the checkpoint with --target gpu")
            calls.append(("enable_tensorrt_varseqlen", (), {}))
            calls.append(("InternalUtils.set_transformer_posid", (POSITION_IDS,), {}))
            calls.append(("InternalUtils.set_transformer_maskid", ("attention_mask",), {}))
        if settings.trt_cache_dir:
            calls.append(("set_optim_cache_dir", (settings.trt_cache_dir,), {}))
    return calls


def apply_call(config: paddle_infer.Config, name: str, args: tuple, kwargs: dict) -> None:
    """Apply one (method, args, kwargs) of `gpu_config_calls` to a Config."""
    if name.startswith("InternalUtils."):
        getattr(paddle_infer.InternalUtils, name.split(".", 1)[1])(config, *args, **kwargs)
    else:
        getattr(config, name)(*args, **kwargs)


def attention_fusable(info: ModelInfo) -> bool:
    """Whether Paddle's GPU multi-head attention fusion can match this model's program: only the
    `--target gpu` export (separate q/k/v projections); models from before the option are fused."""
    return info.attention == "separate_qkv"


def _configure_gpu(config: paddle_infer.Config, info: ModelInfo, settings: PredictorSettings) -> None:
    if not attention_fusable(info):
        import warnings

        warnings.warn(f"{info.path} is the CPU export (fused QKV): on the GPU its attention runs unfused "
                      f"(Paddle's multihead_matmul fusion does not match it). Convert with --target gpu "
                      f"for the fused GPU/TensorRT attention", stacklevel=3)
    for name, args, kwargs in gpu_config_calls(info, settings):
        apply_call(config, name, args, kwargs)


def gpu_available() -> bool:
    import paddle

    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


class _Stream:
    """One predictor with its input and output handles (created once; inputs copied per batch)."""

    def __init__(self, predictor, info: ModelInfo):
        names, want = tuple(predictor.get_input_names()), info.inputs
        assert names == want, f"{info.program_file} takes inputs {names}, model.json says {want}"
        self.predictor = predictor
        self.inputs = [predictor.get_input_handle(n) for n in names]
        self.takes_position_ids = POSITION_IDS in names
        self.output = predictor.get_output_handle(predictor.get_output_names()[0])

    def run(self, arrays) -> np.ndarray:
        if self.takes_position_ids:
            arrays = (*arrays, position_ids(arrays[2]))
        for handle, arr, dtype in zip(self.inputs, arrays, (np.int64, np.int64, np.float32, np.int64)):
            handle.reshape(arr.shape)
            handle.copy_from_cpu(np.ascontiguousarray(arr, dtype=dtype))
        self.predictor.run()
        return self.output.copy_to_cpu()


class PaddlePredictor:
    """`run` takes a padded batch and returns scores [B] or embeddings [B, H].

    With `streams` > 1 it holds that many predictors (`clone()`: one copy of the weights) and
    `run` may be called from that many threads at once: each call takes an idle predictor.
    Paddle releases the GIL while a predictor runs, so the batches really run in parallel."""

    def __init__(self, info: ModelInfo, settings: PredictorSettings = PredictorSettings()):
        if settings.device == "gpu" and not gpu_available():
            raise GpuUnavailable(
                "--device gpu needs the CUDA build of Paddle and a visible GPU: this install has "
                "the CPU-only paddlepaddle. Install requirements-gpu.txt (paddlepaddle-gpu 2.6.2, "
                "CUDA 11.8 / cuDNN 8.6 from the system) in place of requirements.txt, or use --device cpu"
            )
        if info.precision == "int8" and (settings.device != "cpu" or not settings.onednn):
            raise GpuUnavailable(f"{info.path} is an int8 model: it runs on the CPU with oneDNN only; "
                                 f"use --device cpu, or the fp32 model it was quantised from")
        self.info = info
        self.settings = settings
        first = paddle_infer.create_predictor(build_config(info, settings))
        self._streams = [_Stream(first, info)]
        self._streams += [_Stream(first.clone(), info) for _ in range(settings.streams - 1)]
        self._idle: queue.SimpleQueue[_Stream] = queue.SimpleQueue()
        for stream in self._streams:
            self._idle.put(stream)

    @property
    def concurrency(self) -> int:
        """How many `run` calls may be in flight at once."""
        return len(self._streams)

    def run(self, input_ids: np.ndarray, token_type_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        assert input_ids.shape == token_type_ids.shape == attention_mask.shape and input_ids.ndim == 2, (
            f"inputs must share one [batch, seq] shape, got {input_ids.shape}, "
            f"{token_type_ids.shape}, {attention_mask.shape}"
        )
        stream = self._idle.get()
        try:
            return stream.run((input_ids, token_type_ids, attention_mask))
        finally:
            self._idle.put(stream)


def optimized_ops(info: ModelInfo, settings: PredictorSettings) -> dict[tuple[str, str], int]:
    """{(op type, oneDNN data type): count} of the program Paddle runs after its IR passes, for
    the README and the tests (which ops run bf16 or int8). Data type "-" for ops without one."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        paddle_infer.create_predictor(build_config(info, replace(settings, save_optimized_program_to=d)))
        program = next(p for p in Path(d).iterdir() if p.name.endswith(".pdmodel"))
        return program_ops(program)


def program_ops(program: Path) -> dict[tuple[str, str], int]:
    """{(op type, oneDNN data type): count} of a saved program ("-" for ops without a data type)."""
    from collections import Counter

    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc.FromString(Path(program).read_bytes())
    counts: Counter = Counter()
    for block in desc.blocks:
        for op in block.ops:
            if op.type in ("feed", "fetch"):
                continue
            kind = next((a.s for a in op.attrs if a.name == "mkldnn_data_type"), "-")
            counts[(op.type, kind)] += 1
    return dict(counts)
