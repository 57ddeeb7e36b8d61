"""GPU fp16 generation on the fused decoder export (convert/decoder_fused.py): the Paddle
Inference Config plan, what a run needs from the install, and `FusedDecoderPredictor`.
Written to Paddle 2.6's documented API; NOT RUN here (no GPU, and the CPU build of Paddle has no
`fused_multi_transformer` op). See README "GPU generation".

The plan is data (`gpu_generation_config_calls`), so tests check it without a GPU and apply to a
real Config the calls the CPU build accepts; `require_gpu_build` is the one place that says what
is missing. paddle is imported only inside the functions that run a model.

Why the Config calls are what they are:
- `enable_use_gpu(memory_pool_mb, gpu_id, Float32)`: the exported program IS fp16 already (fp16
  weights; float32 norm scales, rotary angles, masks' source, final norm and logits on purpose).
  Precision Half here would run Paddle's auto mixed-precision pass over it, which converts the
  float32 islands we keep and would have to leave the fused op alone; Float32 = "run the program
  as written".
- IR optimisation on: the GPU pass list fuses the ops around the fused op (matmul + elementwise,
  the casts); memory optimisation on (activation buffers reused; the caches are inputs we own).
- zero-copy inputs (`switch_use_feed_fetch_ops(False)`): the caches are GPU tensors the predictor
  shares (`share_external_data`) and the op updates in place, so nothing is copied per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

FUSED_RUNTIME = "fused_multi_transformer"  # = convert.decoder_fused.FUSED_RUNTIME (no paddle import here)
GPU_INSTALL = ("the CUDA build of Paddle: install requirements-gpu.txt (paddlepaddle-gpu 2.6.2, CUDA 11.8 / "
               "cuDNN 8.6 from the system) in place of requirements.txt")


class GpuGenerationUnavailable(RuntimeError):
    """GPU generation was asked for on an install or machine that cannot provide it."""


@dataclass(frozen=True)
class GpuGenerationSettings:
    gpu_id: int = 0
    memory_pool_mb: int = 1024  # initial pool; Paddle grows it as needed
    ir_optim: bool = True
    memory_optim: bool = True

    def __post_init__(self) -> None:
        assert self.gpu_id >= 0, f"gpu_id must be >= 0, got {self.gpu_id}"
        assert self.memory_pool_mb >= 1, f"memory_pool_mb must be >= 1, got {self.memory_pool_mb}"


@dataclass(frozen=True)
class ConfigCall:
    """One call on paddle.inference.Config: method name and positional arguments. A string
    argument "PrecisionType.X" stands for paddle.inference.PrecisionType.X."""

    method: str
    args: tuple = ()


def gpu_generation_config_calls(settings: GpuGenerationSettings) -> list[ConfigCall]:
    """The Config calls of each fused decoder program (prefill and decode alike), in order."""
    calls = [ConfigCall("enable_use_gpu", (settings.memory_pool_mb, settings.gpu_id, "PrecisionType.Float32")),
             ConfigCall("switch_ir_optim", (settings.ir_optim,))]
    if settings.memory_optim:
        calls.append(ConfigCall("enable_memory_optim"))
    calls += [ConfigCall("switch_use_feed_fetch_ops", (False,)), ConfigCall("switch_specify_input_names", (True,)),
              ConfigCall("disable_glog_info")]
    return calls


def apply_config_calls(config, calls: list[ConfigCall]) -> None:
    from pipeline.engine.paddle_env import import_inference

    paddle_infer = import_inference()
    for call in calls:
        args = tuple(getattr(paddle_infer.PrecisionType, a.split(".", 1)[1])
                     if isinstance(a, str) and a.startswith("PrecisionType.") else a for a in call.args)
        getattr(config, call.method)(*args)


def is_fused_model(info) -> bool:
    """Whether a DecoderModelInfo is the fused GPU export (`convert --target gpu`)."""
    return info.meta.get("runtime") == FUSED_RUNTIME


def _cuda_build() -> tuple[bool, int, bool]:
    """(compiled with CUDA, visible GPUs, fused_multi_transformer registered) of this install."""
    from pipeline.engine.paddle_env import import_inference

    import_inference()  # paddle imported the project's way (zlib first, signal handlers kept)
    import paddle
    from paddle.base import framework

    cuda = paddle.device.is_compiled_with_cuda()
    gpus = paddle.device.cuda.device_count() if cuda else 0
    try:
        framework.OpProtoHolder.instance().get_op_proto("fused_multi_transformer")
        fused = True
    except ValueError:
        fused = False
    return cuda, gpus, fused


def require_gpu_build(probe: Callable[[], tuple[bool, int, bool]] | None = None) -> None:
    """Raise GpuGenerationUnavailable naming what is missing for `generate --device gpu`.
    `probe` (tests): what the install offers, as `_cuda_build` returns it."""
    cuda, gpus, fused = (probe or _cuda_build)()
    if not cuda:
        import paddle

        raise GpuGenerationUnavailable(
            f"generate --device gpu needs {GPU_INSTALL}. This install has the CPU-only paddlepaddle "
            f"{paddle.__version__}, which has no GPU kernels and does not even register the "
            f"fused_multi_transformer op the GPU decoder export uses. Or run with --device cpu "
            f"(and a model converted without --target gpu)")
    if not fused:
        raise GpuGenerationUnavailable("this CUDA build of Paddle has no fused_multi_transformer op: "
                                       f"generate --device gpu needs {GPU_INSTALL}")
    if gpus < 1:
        raise GpuGenerationUnavailable("generate --device gpu: Paddle was built with CUDA but sees no GPU "
                                       "(check CUDA_VISIBLE_DEVICES and the driver)")


def generation_device(device: str, precision: str, tensorrt: bool, fused_model: bool, model_path: Path,
                      streams: int | None = None,
                      probe: Callable[[], tuple[bool, int, bool]] | None = None) -> tuple[str, str]:
    """(device, precision) of a generation run, or ValueError saying why not: the CPU runs the
    fp32 CPU export; the GPU runs the fp16 fused export (`convert --target gpu`) on a CUDA build."""
    if tensorrt:
        raise ValueError("--tensorrt / --trt-varlen are for scoring models; generation on the GPU runs the fused "
                         "decoder op (--device gpu --precision fp16)")
    if device == "cpu":
        if precision == "fp16":
            raise ValueError("--precision fp16 needs --device gpu: generation on the CPU runs fp32 (Paddle's CPU "
                             "build has no fp16 kernels for the decoder)")
        if precision not in ("auto", "fp32", "bf16", "int8"):
            raise ValueError(f"generation on the CPU runs auto, fp32, bf16 or int8, not {precision}")
        if fused_model:
            raise ValueError(f"{model_path} is the GPU export (convert --target gpu: Paddle's fused_multi_transformer "
                             f"op, fp16), which the CPU cannot run: use --device gpu --precision fp16, or convert "
                             f"the checkpoint without --target gpu for the CPU")
        return "cpu", precision  # config.choose_precision decides auto / bf16 / int8 from gates and CPU
    if device != "gpu":
        raise ValueError(f"--device must be cpu or gpu, got {device!r}")
    if precision not in ("auto", "fp16"):
        raise ValueError(f"generation on the GPU runs fp16 (the fused decoder export), not {precision}: use "
                         f"--precision fp16")
    if not fused_model:
        raise ValueError(f"{model_path} is the CPU export of the decoder: generation on the GPU needs the fused "
                         f"export, `convert CHECKPOINT DIR --target gpu`")
    if streams is not None and streams > 1:
        raise ValueError("--streams > 1 is for the CPU: on a GPU one predictor keeps the device busy")
    try:
        require_gpu_build(probe)
    except GpuGenerationUnavailable as e:
        raise ValueError(str(e)) from e
    return "gpu", "fp16"


def fused_backend(model_dir: Path, settings: GpuGenerationSettings = GpuGenerationSettings()):
    """A Generator backend (rows, max_len, threads) -> FusedDecoderPredictor."""

    def backend(rows: int, max_len: int, threads: int) -> "FusedDecoderPredictor":
        return FusedDecoderPredictor(model_dir, rows, max_len, settings)

    return backend


class FusedDecoderPredictor:
    """The StepModel of engine/decoding.py (prefill / step / select / truncate) on the fused export.

    Caches: one paddle GPU tensor per layer, [2, B, heads, max_len, D] fp16 (the op's layout; the
    kv heads repeated for GQA), allocated at prefill for that batch and shared with both
    predictors' cache_kv_i handles (`share_external_data`): the op writes prefill's columns and each
    step's new column into them in place. `time_step` is a CPU int32 tensor (the op reads it on
    the host). The prompt pass runs the whole left-padded batch in one call (the CPU predictor's
    grouped prefill would need per-row cache offsets the op does not take)."""

    def __init__(self, model_dir: Path | str, max_batch: int, max_len: int,
                 settings: GpuGenerationSettings = GpuGenerationSettings(),
                 probe: Callable[[], tuple[bool, int, bool]] | None = None):
        require_gpu_build(probe)
        from pipeline.engine.decoder_io import DECODE_PROGRAM, PARAMS_FILE, PREFILL_PROGRAM
        from pipeline.engine.modeldir import load_model_info
        from pipeline.engine.paddle_env import import_inference

        paddle_infer = import_inference()
        info = load_model_info(Path(model_dir))
        assert is_fused_model(info), f"{model_dir} is not a fused GPU export (convert --target gpu)"
        arch = info.architecture
        self.num_layers, self.heads = int(arch["num_hidden_layers"]), int(arch["num_attention_heads"])
        self.head_dim = info.head_dim
        self.max_batch, self.max_len = max_batch, max_len
        assert max_len <= int(info.meta["fused"]["max_len"]), (
            f"max_len {max_len} exceeds the {info.meta['fused']['max_len']} cache columns {model_dir} was exported for")
        d = Path(model_dir)
        calls = gpu_generation_config_calls(settings)
        self._predictors = []
        for program in (PREFILL_PROGRAM, DECODE_PROGRAM):
            config = paddle_infer.Config(str(d / program), str(d / PARAMS_FILE))
            apply_config_calls(config, calls)
            self._predictors.append(paddle_infer.create_predictor(config))
        self._prefill, self._decode = self._predictors
        self.export_max_len = int(info.meta["fused"]["max_len"])
        self.prefill_tokens = 0
        self.batch = self.length = 0
        self._caches: list = []

    def _feed(self, predictor, name: str, arr: np.ndarray) -> None:
        h = predictor.get_input_handle(name)
        h.reshape(list(arr.shape))
        h.copy_from_cpu(np.ascontiguousarray(arr))

    def _share_caches(self) -> None:
        from pipeline.convert.decoder_fused import cache_names  # names only (no paddle there at import)

        for predictor in self._predictors:
            for name, t in zip(cache_names(self.num_layers), self._caches):
                predictor.get_input_handle(name).share_external_data(t)

    def _logits(self, predictor) -> np.ndarray:
        return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()

    def prefill(self, input_ids, position_ids, attention_mask) -> np.ndarray:
        import paddle

        B, S = input_ids.shape
        assert B <= self.max_batch and S < self.max_len, (B, S, self.max_batch, self.max_len)
        shape = [2, B, self.heads, self.max_len, self.head_dim]  # this batch's columns, not the export's limit
        self._caches = [paddle.zeros(shape, dtype="float16") for _ in range(self.num_layers)]
        self._share_caches()
        self._feed(self._prefill, "input_ids", input_ids.astype(np.int64))
        self._feed(self._prefill, "position_ids", position_ids.astype(np.int64))
        self._feed(self._prefill, "attention_mask", attention_mask.astype(np.float32))
        self._prefill.run()
        self.batch, self.length = B, S
        self.prefill_tokens += B * S
        return self._logits(self._prefill)

    def step(self, input_ids, position_ids, attention_mask) -> np.ndarray:
        import paddle

        T = self.length
        assert attention_mask.shape == (self.batch, T + 1), (attention_mask.shape, self.batch, T)
        if T + 1 > self.max_len:
            from pipeline.engine.decoder_predictor import DecoderCacheFull

            raise DecoderCacheFull(f"a step at column {T} needs more than the {self.max_len} cache columns")
        self._feed(self._decode, "input_ids", input_ids.astype(np.int64))
        self._feed(self._decode, "position_ids", position_ids.astype(np.int64))
        self._feed(self._decode, "attention_mask", attention_mask.astype(np.float32))
        step = paddle.to_tensor(np.array([T], np.int32), place=paddle.CPUPlace())
        self._decode.get_input_handle("time_step").share_external_data(step)
        self._decode.run()
        self.length = T + 1
        return self._logits(self._decode)

    def select(self, rows: np.ndarray) -> None:
        import paddle

        index = paddle.to_tensor(np.asarray(rows, np.int64))
        self._caches = [paddle.index_select(c, index, axis=1) for c in self._caches]  # one gather per layer
        self.batch = len(rows)
        self._share_caches()

    def truncate(self, length: int) -> None:
        assert 0 < length <= self.length, f"truncate to {length}: the cache holds {self.length} columns"
        self.length = length  # later columns are overwritten by the next steps and masked until then
