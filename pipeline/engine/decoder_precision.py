"""What each runtime precision of a decoder directory means to Paddle Inference (paddle).

- fp32: the programs as exported; the decode program runs without IR passes (faster on its
  small per-step ops: engine/decoder_predictor.py).
- bf16: the same directory with oneDNN's bf16 kernels (`Config.enable_mkldnn_bfloat16()`,
  Paddle's default bf16 placement: every op with a bf16 kernel). The bf16 placement and
  reorders are IR passes, so both programs run with them (`decode_ir_optim_default`).
- int8: a directory from `quantize` (model.json "precision": "int8"), whose programs carry
  quantize/dequantize ops before the Linears' inputs; `enable_mkldnn_int8(ops)` makes those
  ops int8 (oneDNN u8s8/s8s8 GEMMs). IR passes on both programs too.

`params_file` lets a directory give a program its own params file (`prefill.pdiparams` beside
`prefill.pdmodel`): an int8 directory needs it, because the calibrated scales are persistable
variables of each program and a combined params file must hold exactly its program's
persistables; fp32 directories share `decoder.pdiparams`.

`optimized_ops` lists the program Paddle really runs after its passes, with each op's oneDNN
data type (bf16 / int8 / float32), for the tests and the README.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from pipeline.engine.decoder_io import PARAMS_FILE
from pipeline.engine.paddle_env import import_inference

paddle_infer = import_inference()

DECODER_PRECISIONS = ("fp32", "bf16", "int8")
# IR passes deleted for bf16: without them a Linear (matmul_v2 with a weight, no bias) stays a
# oneDNN matmul, which has a bf16 kernel, instead of becoming a `mul` (MKL, fp32 only).
BF16_DELETED_PASSES: tuple[str, ...] = ("gpu_cpu_map_matmul_v2_to_mul_pass", "gpu_cpu_map_matmul_v2_to_matmul_pass")
# The op types an int8 decoder directory runs in int8 unless its model.json says otherwise.
DEFAULT_INT8_OPS = ("fc",)


def decode_precision_default(precision: str) -> str:
    """The decode program's precision for a run at `precision`: bf16 runs the prefill program
    only in bf16 (measured: the passes bf16 needs make the decode step slower than fp32 without
    them; see the module docstring); int8 directories have int8 in both programs."""
    assert precision in DECODER_PRECISIONS, f"precision must be one of {DECODER_PRECISIONS}, got {precision!r}"
    return "fp32" if precision == "bf16" else precision


def decode_ir_optim_default(precision: str) -> bool:
    """fp32: no IR passes on the decode program (they cost more than they fuse there); bf16
    and int8 exist only through the passes."""
    assert precision in DECODER_PRECISIONS, f"precision must be one of {DECODER_PRECISIONS}, got {precision!r}"
    return precision != "fp32"


def params_file(model_dir: Path, program: str) -> Path:
    """The params file `program` reads: its own `<stem>.pdiparams` where the directory has one
    (int8), else the shared `decoder.pdiparams`."""
    own = Path(model_dir) / (Path(program).stem + ".pdiparams")
    return own if own.is_file() else Path(model_dir) / PARAMS_FILE


def apply_precision(config, precision: str, int8_ops: tuple[str, ...] = DEFAULT_INT8_OPS) -> None:
    """The oneDNN precision calls on a Config that already has oneDNN on."""
    assert precision in DECODER_PRECISIONS, f"precision must be one of {DECODER_PRECISIONS}, got {precision!r}"
    if precision == "bf16":
        config.enable_mkldnn_bfloat16()
        for name in BF16_DELETED_PASSES:
            config.delete_pass(name)
    elif precision == "int8":
        config.enable_mkldnn_int8(set(int8_ops))


def _key(program: Path, params: Path, precision: str, isa: str) -> str:
    import hashlib
    from importlib.metadata import version

    st = Path(params).stat()
    what = [hashlib.sha256(Path(program).read_bytes()).hexdigest(), str(Path(params).resolve()), st.st_size,
            st.st_mtime_ns, precision, isa, version("paddlepaddle"), BF16_DELETED_PASSES]
    return hashlib.sha256(repr(what).encode()).hexdigest()[:24]


def prepared_program(program: Path, params: Path, precision: str, threads: int, cache_root: Path | None,
                     isa: str = "") -> tuple[Path, Path] | None:
    """(program, params) of `program` as Paddle's IR passes leave it at `precision`, saved once per
    program, params file, precision, oneDNN ISA and paddle version under `cache_root`
    (`optimized-programs/<key>/`); loaded with the passes off. Paddle 2.6.2's bf16 placement
    pass takes minutes on the decoder's programs (its RemoveOrphanedOperators reruns a pattern
    search over the whole graph per op it removes), so it runs once, not per predictor. None
    when there is no cache folder (the caller then runs the passes itself)."""
    import os
    import shutil

    if cache_root is None or precision == "fp32":
        return None
    entry = Path(cache_root) / "optimized-programs" / _key(program, params, precision, isa)
    done = entry / "_optimized.pdmodel", entry / "_optimized.pdiparams"
    if all(f.is_file() for f in done):
        return done
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        config = paddle_infer.Config(str(program), str(params))
        config.switch_ir_optim(True)
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads)
        config.enable_mkldnn()
        apply_precision(config, precision)
        config.switch_use_feed_fetch_ops(False)
        config.disable_glog_info()
        config.enable_save_optim_model(True)
        config.set_optim_cache_dir(str(tmp))
        paddle_infer.create_predictor(config)
        if not all((tmp / f.name).is_file() for f in done):
            return None
        try:
            os.replace(tmp, entry)
        except OSError:  # another process saved it first: use theirs
            pass
        return done if all(f.is_file() for f in done) else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def optimized_ops(program: Path, params: Path, precision: str, ir_optim: bool = True, threads: int = 1,
                  int8_ops: tuple[str, ...] = DEFAULT_INT8_OPS) -> dict[tuple[str, str], int]:
    """{(op type, oneDNN data type): count} of `program` as Paddle runs it at `precision`
    ("-" for ops without a data type attribute)."""
    from paddle.base.proto import framework_pb2

    with tempfile.TemporaryDirectory() as d:
        config = paddle_infer.Config(str(program), str(params))
        config.switch_ir_optim(ir_optim)
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads)
        config.enable_mkldnn()
        apply_precision(config, precision, int8_ops)
        config.switch_use_feed_fetch_ops(False)
        config.disable_glog_info()
        config.enable_save_optim_model(True)
        config.set_optim_cache_dir(d)
        paddle_infer.create_predictor(config)
        saved = [p for p in Path(d).iterdir() if p.name.endswith(".pdmodel")]
        if not saved:  # without IR passes nothing is rewritten (nor saved): the program as it is
            saved = [Path(program)]
        return program_ops(saved[0])


def program_ops(program: Path) -> dict[tuple[str, str], int]:
    """{(op type, oneDNN data type): count} of a saved program (the encoder's counter)."""
    from pipeline.engine.predictor import program_ops as count_ops

    return count_ops(program)