"""Paddle Inference predictor behind the small `Backend` interface the runner uses.

The environment that makes Paddle fast on this project's CPUs is set here, before paddle is
first imported, so users never have to know about it:
- `MKL_DEBUG_CPU_TYPE=5`: MKL otherwise picks slow generic kernels on AMD CPUs (measured
  1.3x on the oneDNN predictor, 2x on plain MKL paths; see README "Performance notes").
- `import zlib` first: paddle 2.6 breaks Python's zlib if it is imported before it.
"""

from __future__ import annotations

import os
import zlib  # noqa: F401 - see the module docstring

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
os.environ.setdefault("GLOG_minloglevel", "2")  # keep the C++ pass log off the console
os.environ.setdefault("FLAGS_use_mkldnn", "1")

from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
from paddle import inference as paddle_infer  # noqa: E402

from pipeline.modeldir import ModelInfo  # noqa: E402

INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")


@dataclass(frozen=True)
class PredictorSettings:
    threads: int = 1
    device: str = "cpu"  # 'cpu' | 'gpu'
    onednn: bool = True
    ir_optim: bool = True
    onednn_cache_capacity: int = 0  # 0: keep every shape's kernels (batches vary in shape)
    save_optimized_program_to: str | None = None  # a folder to dump the optimised program into

    def __post_init__(self) -> None:
        assert self.threads >= 1, f"threads must be >= 1, got {self.threads}"
        assert self.device in ("cpu", "gpu"), f"device must be cpu or gpu, got {self.device!r}"


def build_config(info: ModelInfo, settings: PredictorSettings) -> paddle_infer.Config:
    """The paddle.inference.Config for a model and settings; separate so tests can inspect it."""
    config = paddle_infer.Config(str(info.program_file), str(info.params_file))
    config.switch_ir_optim(settings.ir_optim)
    if settings.device == "cpu":
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(settings.threads)
        if settings.onednn:
            config.enable_mkldnn()
            config.set_mkldnn_cache_capacity(settings.onednn_cache_capacity)
    else:
        raise NotImplementedError("the GPU path is not built yet")
    # Handles are created once and inputs copied in per batch (zero-copy tensors).
    config.switch_use_feed_fetch_ops(False)
    config.switch_specify_input_names(True)
    config.disable_glog_info()
    if settings.save_optimized_program_to:
        config.enable_save_optim_model(True)
        config.set_optim_cache_dir(settings.save_optimized_program_to)
    return config


class PaddlePredictor:
    """One predictor; `run` takes a padded batch and returns scores [B] or embeddings [B, H]."""

    def __init__(self, info: ModelInfo, settings: PredictorSettings = PredictorSettings()):
        self.info = info
        self.settings = settings
        self._predictor = paddle_infer.create_predictor(build_config(info, settings))
        names = self._predictor.get_input_names()
        assert list(names) == list(INPUT_NAMES), f"{info.program_file} takes inputs {names}, expected {INPUT_NAMES}"
        self._inputs = [self._predictor.get_input_handle(n) for n in INPUT_NAMES]
        self._output = self._predictor.get_output_handle(self._predictor.get_output_names()[0])

    def run(self, input_ids: np.ndarray, token_type_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        assert input_ids.shape == token_type_ids.shape == attention_mask.shape and input_ids.ndim == 2, (
            f"inputs must share one [batch, seq] shape, got {input_ids.shape}, "
            f"{token_type_ids.shape}, {attention_mask.shape}"
        )
        for handle, arr, dtype in zip(self._inputs, (input_ids, token_type_ids, attention_mask),
                                      (np.int64, np.int64, np.float32)):
            handle.reshape(arr.shape)
            handle.copy_from_cpu(np.ascontiguousarray(arr, dtype=dtype))
        self._predictor.run()
        return self._output.copy_to_cpu()
