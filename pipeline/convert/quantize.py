"""Post-training int8 quantisation of a runtime model, with a quality gate (CPU, oneDNN).

The path that really executes int8 kernels on an AVX2 CPU through Paddle Inference 2.6 (see
../shared/paddle-cpu-notes.md "int8 on this CPU" and README "int8 (CPU)"):

1. PaddleSlim `quant_post_static` on the exported `.pdmodel`: weights of the `matmul_v2` ops
   (the Linear layers) are quantised per output channel, activation ranges are calibrated on a
   sample of the user's data, and the program gets quantize_linear/dequantize_linear ops
   (`onnx_format=True`, the form oneDNN's int8 passes read).
2. The predictor runs it with `config.enable_mkldnn_int8({"fc"})`: the Linear layers become
   oneDNN int8 `fc` ops (kernel `gemm_s8s8s32` / brgemm int8 in ONEDNN_VERBOSE); everything
   else (attention matmuls, layer norm, softmax, GELU) stays fp32. Making every op int8
   (`enable_mkldnn_int8()` with no set) is ~36x slower: the attention matmuls fall back to
   reference kernels.

Before calibration the program may be rewritten offline (`pipeline.convert.smoothquant`; the
QuantSettings fields `weight_scales`, `smooth`, `outlier_channels`): this is what makes every
Linear int8 pass the gate (`EVERY_LINEAR`, docs/int8-methods.md).

The calibration files are split by a hash of the qid into a calibration half and a held-out
half (no query is in both). The held-out half is scored by the fp32 model and the int8 model
exactly as `run` scores (cross: the model's score; bi: dot product of the unit embeddings), and
the gate compares NDCG@10 and PNR: loss rate |m_fp32 - m_int8| / m_fp32 must be at most
`max_loss_rate` (1%) for both. A model that fails is not written, unless `force`, which writes
it marked as failing (`model.json` "quantization.gate.passed": false).

The output is written into a temporary directory beside `out`, checked, and renamed into place.
paddle and paddleslim are imported only inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline import __version__
from pipeline.convert.errors import ConversionError
from pipeline.convert.gate import (
    DEFAULT_MAX_LOSS_RATE,
    GateResult,
    Rows,
    encode_rows,
    evaluate_gate,
    held_out_mask,
    read_rows,
)
from pipeline.engine.batching import pad_batch, plan_batches
from pipeline.engine.engine import EngineSettings
from pipeline.engine.modeldir import (
    MODEL_JSON,
    PARAMS_FILE,
    PROGRAM_FILE,
    ModelInfo,
    derived_meta,
    load_model_info,
    sha256_file,
    staged_dir,
    write_model_json,
)
from pipeline.engine.text import TextEncoder, TextEncoderSpec
from pipeline.engine.tokenizer import Encoded
from pipeline.io.reader import ColumnMap, list_input_files

INSTALL_HINT = "int8 quantisation needs PaddleSlim: pip install -r requirements-quant.txt"


LINEAR_KINDS = ("qkv", "attn_out", "ffn_in", "ffn_out")


WEIGHT_SCALES = ("onednn", "fixed")


@dataclass(frozen=True)
class QuantSettings:
    """How the model is quantised. The default runs int8 only the attention block's Linears (the
    QKV projection and the attention output) with Paddle's own weight scales: today's behaviour,
    which passes the 1% gate on the default model. `EVERY_LINEAR` (docs/int8-methods.md) runs all
    four Linear kinds int8 within the gate: Paddle's weight scales fixed, SmoothQuant on the FFN
    inputs and the few outlier channels of the Linear inputs kept out of int8."""

    int8_linears: tuple[str, ...] = ("qkv", "attn_out")  # Linear kinds (LINEAR_KINDS) run in int8
    algo: str = "abs_max"  # activation calibration: 'abs_max' | 'avg' | 'hist' | 'KL' | 'mse' | 'emd'
    hist_percent: float = 0.9999
    weight_bits: int = 8
    activation_bits: int = 8
    quantizable_op_type: tuple[str, ...] = ("matmul_v2",)
    weight_quantize_type: str = "channel_wise_abs_max"
    onednn_int8_ops: tuple[str, ...] = ("fc",)  # ops the predictor runs in int8
    calib_sequences: int = 256  # sequences fed to calibration (at most)
    calib_batch_size: int = 32  # calibration batches are cut on the run's token budget (EngineSettings)
    # 'onednn': Paddle's oneDNN pass derives per-output-channel fc weight scales itself, from the
    # wrong axis in Paddle 2.6.2 (smoothquant module docstring, item 3); 'fixed': qkv, attn_out and
    # ffn_in weights get one recorded scale each, and the FFN channels are reordered so that the
    # pass's per-channel scales of ffn_out come out right (smoothquant.group_rows_for_chunks).
    weight_scales: str = "onednn"
    smooth: tuple[tuple[str, float], ...] = ()  # (kind, SmoothQuant alpha) of int8 kinds, e.g. (("ffn_in", 0.5),)
    outlier_channels: tuple[tuple[str, int], ...] = ()  # (kind, k): k input channels kept out of int8
    fp32_linears: tuple[str, ...] = ()  # Linears ('layer0.ffn_out', `linear_names`) kept fp32 within int8 kinds

    def __post_init__(self) -> None:
        unknown = set(self.int8_linears) - set(LINEAR_KINDS)
        assert self.int8_linears and not unknown, (
            f"int8_linears must be a non-empty subset of {LINEAR_KINDS}, got {self.int8_linears}")
        assert self.weight_scales in WEIGHT_SCALES, f"weight_scales must be one of {WEIGHT_SCALES}"
        for field_name, pairs in (("smooth", self.smooth), ("outlier_channels", self.outlier_channels)):
            kinds = [k for k, _ in pairs]
            assert len(set(kinds)) == len(kinds) and set(kinds) <= set(self.int8_linears), (
                f"{field_name} names each of the int8 kinds {self.int8_linears} at most once, got {kinds}")
        assert all(0.0 <= a <= 1.0 for _, a in self.smooth), f"smooth alphas must be in [0, 1]: {self.smooth}"
        assert all(int(n) == n and n >= 0 for _, n in self.outlier_channels), (
            f"outlier channel counts must be integers >= 0: {self.outlier_channels}")
        assert "attn_out" not in dict(self.outlier_channels), (
            "attn_out is smoothed by folding 1/s into the V weights: it has no mul to split channels off")

    @property
    def rewrites(self) -> bool:
        """Whether the program is rewritten offline before calibration (smoothquant)."""
        return bool(self.smooth or any(n for _, n in self.outlier_channels) or self.regroups)

    @property
    def regroups(self) -> bool:
        return self.weight_scales == "fixed" and "ffn_out" in self.int8_linears

    def record(self) -> dict:
        """The settings as model.json "quantization.method" writes them."""
        d = asdict(self)
        d["smooth"] = dict(self.smooth)
        d["outlier_channels"] = dict(self.outlier_channels)
        return d


EVERY_LINEAR = QuantSettings(
    int8_linears=LINEAR_KINDS, weight_scales="fixed", smooth=(("ffn_in", 0.5), ("ffn_out", 0.9)),
    outlier_channels=(("qkv", 8), ("ffn_in", 8), ("ffn_out", 4)))
METHODS = {"attention": QuantSettings(), "every-linear": EVERY_LINEAR}  # `quantize --method`


def settings_for(method: str = "attention", **overrides) -> QuantSettings:
    """`METHODS[method]` with the given fields replaced (the CLI's flags); ConversionError for an
    unknown method or a combination QuantSettings rejects."""
    from dataclasses import replace

    if method not in METHODS:
        raise ConversionError(f"--method takes one of {', '.join(METHODS)}; got {method!r}")
    try:
        return replace(METHODS[method], **{k: v for k, v in overrides.items() if v is not None})
    except AssertionError as e:
        raise ConversionError(str(e)) from e


def parse_kind_values(text: str, cast, what: str) -> tuple[tuple[str, object], ...]:
    """'ffn_in=0.5,ffn_out=0.9' -> (('ffn_in', 0.5), ('ffn_out', 0.9)); '' or 'none' -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    out = []
    for item in text.split(","):
        kind, sep, value = item.strip().partition("=")
        if not sep or kind not in LINEAR_KINDS:
            raise ConversionError(f"{what} takes KIND=VALUE pairs with KIND in {', '.join(LINEAR_KINDS)}; got {item!r}")
        try:
            out.append((kind, cast(value)))
        except ValueError as e:
            raise ConversionError(f"{what}: {item!r}: {e}") from e
    return tuple(out)


# ----------------------------------------------------------------------------- quantising


def calibration_batches(enc: Encoded, pad_id: int, qs: QuantSettings) -> list[dict[str, np.ndarray]]:
    """At most `calib_sequences` sequences, spread evenly over the calibration half, in
    length-sorted padded batches on the run's token budget (the shapes `run` produces)."""
    n = len(enc)
    if n > qs.calib_sequences:
        idx = np.linspace(0, n - 1, qs.calib_sequences).round().astype(np.int64)
        enc = Encoded(enc.ids.take(idx), enc.types.take(idx))
    out = []
    for b in plan_batches(enc.lengths, EngineSettings.max_batch_tokens, qs.calib_batch_size):
        ids, types, mask = pad_batch(enc, b, pad_id)
        out.append({"input_ids": ids, "token_type_ids": types, "attention_mask": mask})
    return out


def linear_layers(desc) -> list[tuple[str, str, str]]:
    """(kind, input name, weight name) of every Linear (matmul_v2 with a parameter as Y) of a
    program, in program order; the input name is the raw activation, before any quantize /
    dequantize pair (of a smoothed Linear: the output of its 1/s mul, see `smoothquant`). The
    kind comes from what produces that input, which holds for any post-LN ERNIE/BERT export
    whether Q, K and V are fused or separate: GELU -> 'ffn_out'; the reshape/transpose of the
    attention context -> 'attn_out'; a layer norm -> 'qkv' before the layer's attention output
    and 'ffn_in' after it; anything else -> 'head' (the pooler and the classifier of a cross
    model, never quantised). The fp32 side paths of outlier channels are not Linears here."""
    from pipeline.convert.smoothquant import SMOOTH_PREFIX

    block = desc.blocks[0]
    params = {v.name for v in block.vars if v.persistable}
    producer, through_qdq, smoothed = {}, {}, {}
    for op in block.ops:
        for v in op.outputs:
            for a in v.arguments:
                producer[a] = op.type
        if op.type in ("quantize_linear", "dequantize_linear"):
            x = next(v for v in op.inputs if v.parameter == "X").arguments[0]
            through_qdq[next(v for v in op.outputs if v.parameter == "Y").arguments[0]] = x
        elif op.type == "elementwise_mul":  # a SmoothQuant 1/s in front of a Linear: look through it
            ins = {v.parameter: v.arguments[0] for v in op.inputs if v.arguments}
            if ins.get("Y", "").startswith(SMOOTH_PREFIX):
                smoothed[next(v for v in op.outputs if v.parameter == "Out").arguments[0]] = ins["X"]

    def raw(name: str) -> str:
        while name in through_qdq:
            name = through_qdq[name]
        return name

    out, after_attention = [], False
    for op in block.ops:
        if op.type != "matmul_v2":
            continue
        args = {v.parameter: raw(v.arguments[0]) for v in op.inputs}
        if args["Y"] not in params:
            continue  # an attention matmul: activations on both sides
        if args["Y"].startswith(SMOOTH_PREFIX):
            continue  # the fp32 side path of a Linear's outlier channels (smoothquant), not a Linear
        fed_by = producer.get(raw(smoothed.get(args["X"], args["X"])))
        if fed_by == "gelu":
            kind, after_attention = "ffn_out", False
        elif fed_by in ("reshape2", "transpose2"):
            kind, after_attention = "attn_out", True
        elif fed_by == "layer_norm":
            kind = "ffn_in" if after_attention else "qkv"
        else:
            kind = "head"  # pooler (reads the [CLS] slice) or classifier: always fp32
        out.append((kind, args["X"], args["Y"]))
    return out


def linear_names(desc) -> list[str]:
    """'layer{n}.{kind}' of every Linear of `linear_layers(desc)` (n counted from 0 at each
    'qkv'), 'head{i}' for the head Linears: the names `QuantSettings.fp32_linears` takes."""
    names, layer, heads = [], -1, 0
    for kind, _, _ in linear_layers(desc):
        if kind == "head":
            names.append(f"head{heads}")
            heads += 1
            continue
        layer += kind == "qkv"
        names.append(f"layer{max(layer, 0)}.{kind}")
    return names


def keep_int8_inputs(program_file: Path, kinds: Sequence[str], fp32_linears: Sequence[str] = ()) -> int:
    """Leave activation quantize/dequantize pairs only on the inputs of the Linears of `kinds`,
    except those named in `fp32_linears` (`linear_names`); returns how many Linears keep them.

    Paddle's oneDNN int8 pass makes an fc int8 when its input has a scale, whatever PaddleSlim
    did to its weights (`skip_tensor_list` alone leaves every fc int8), and it carries scales
    across reshape/transpose. So every other activation pair is removed and its consumers read
    the raw tensor again; those fc then have no input scale and stay fp32."""
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc.FromString(program_file.read_bytes())
    block = desc.blocks[0]
    keep = set(_chosen_inputs(desc, kinds, fp32_linears))
    raw_of_quantized, raw_of, drop, still_quantized = {}, {}, set(), set()
    for i, op in enumerate(block.ops):
        ins = {v.parameter: v.arguments[0] for v in op.inputs if v.arguments}
        outs = {v.parameter: v.arguments[0] for v in op.outputs if v.arguments}
        if op.type == "quantize_linear" and ins["X"] not in keep:
            raw_of_quantized[outs["Y"]] = ins["X"]
            drop.add(i)
        elif op.type == "quantize_linear":
            still_quantized.add(ins["X"])
        elif op.type == "dequantize_linear" and ins["X"] in raw_of_quantized:
            raw_of[outs["Y"]] = raw_of_quantized[ins["X"]]
            drop.add(i)
    kept = [op for i, op in enumerate(block.ops) if i not in drop]
    for op in kept:
        for v in op.inputs:
            names = [raw_of.get(a, a) for a in v.arguments]
            del v.arguments[:]
            v.arguments.extend(names)
    del block.ops[:]
    block.ops.extend(kept)
    program_file.write_bytes(desc.SerializeToString())
    # only those whose input really still goes through a quantize op (not merely of a chosen kind)
    return sum(1 for x in _chosen_inputs(desc, kinds, fp32_linears) if x in still_quantized)


def _chosen_inputs(desc, kinds: Sequence[str], fp32_linears: Sequence[str]) -> list[str]:
    """Input activations of the Linears that run int8: of `kinds`, not named in `fp32_linears`."""
    layers, names = linear_layers(desc), linear_names(desc)
    unknown = set(fp32_linears) - set(names)
    if unknown:
        raise ConversionError(f"fp32_linears {sorted(unknown)} name no Linear of the program (names: "
                              f"{names[0]} ... {names[-1]})")
    return [x for (kind, x, _), n in zip(layers, names) if kind in kinds and n not in fp32_linears]


def _feed_loader(batches: list[dict[str, np.ndarray]]):
    """Paddle 2.6's PTQ accepts only a `paddle.io.DataLoader` (it ignores batch_generator) and
    calls it to get an iterable of feed dicts: a DataLoader subclass that replays ready batches."""
    import paddle

    class FeedLoader(paddle.io.DataLoader):
        def __init__(self):  # noqa: D107 - no dataset, no workers: the batches are already made
            self.batches = batches

        def __call__(self):
            return iter(self.batches)

        def __iter__(self):
            return iter(self.batches)

        def __len__(self):
            return len(self.batches)

    return FeedLoader()


def quantize_program(info: ModelInfo, batches: list[dict[str, np.ndarray]], out_dir: Path,
                     qs: QuantSettings) -> dict:
    """PaddleSlim PTQ of `info`'s program into `out_dir` (inference.pdmodel + .pdiparams), after
    the offline rewrite `qs` asks for (smoothquant: smoothing, outlier channels, FFN channel
    order; checked to keep the fp32 outputs); returns what was done, for the record."""
    try:
        import paddle  # noqa: F401
        import paddleslim  # noqa: F401
    except ImportError as e:
        raise ConversionError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    import tempfile

    from paddle.base.proto import framework_pb2

    from pipeline.convert import smoothquant as sq
    from pipeline.convert.export import add_transpose_xshape

    done: dict = {}
    with tempfile.TemporaryDirectory(prefix=".rewrite-", dir=out_dir.parent) as tmp:
        src = info.path
        if qs.rewrites:
            src = Path(tmp)
            done = _rewrite(info, batches, src, qs)
        _calibrate(src, batches, out_dir, qs)
    desc = framework_pb2.ProgramDesc.FromString((out_dir / PROGRAM_FILE).read_bytes())
    chosen = len(_chosen_inputs(desc, qs.int8_linears, qs.fp32_linears))
    kept = keep_int8_inputs(out_dir / PROGRAM_FILE, qs.int8_linears, qs.fp32_linears)
    if kept != chosen:  # the record would claim int8 for Linears that run fp32
        raise ConversionError(f"PaddleSlim calibrated {kept} of the {chosen} Linears of kinds "
                              f"{list(qs.int8_linears)}; the others would silently run fp32")
    if qs.weight_scales == "fixed":
        desc = framework_pb2.ProgramDesc.FromString((out_dir / PROGRAM_FILE).read_bytes())
        int8_inputs = set(_chosen_inputs(desc, qs.int8_linears, qs.fp32_linears))
        weights = [w for kind, x, w in linear_layers(desc) if x in int8_inputs and kind != "ffn_out"]
        done["per_tensor_weight_scales"] = sq.add_weight_scales(out_dir, weights, PROGRAM_FILE, PARAMS_FILE)
    # PaddleSlim's saved program drops the transpose2 XShape outputs that `convert` adds for
    # oneDNN's matmul_transpose_reshape fusion: give them back.
    done["transpose_xshape_restored"] = add_transpose_xshape(out_dir / PROGRAM_FILE)
    return done


def _rewrite(info: ModelInfo, batches: list[dict[str, np.ndarray]], dst: Path, qs: QuantSettings) -> dict:
    """smoothquant's offline rewrite of `info` into `dst`: smoothing and outlier channels, then
    the FFN channel order for Paddle's ffn_out weight scales; fp32 outputs checked after each."""
    from paddle.base.proto import framework_pb2

    from pipeline.convert import smoothquant as sq

    record: dict = {}
    src = info.path
    if qs.smooth or any(n for _, n in qs.outlier_channels):
        res = sq.smooth_model(src, dst, batches, dict(qs.smooth), dict(qs.outlier_channels), PROGRAM_FILE, PARAMS_FILE)
        record["smoothquant"] = res.record
        src = dst
    if qs.regroups:
        program = (src / PROGRAM_FILE).read_bytes()
        desc = framework_pb2.ProgramDesc.FromString(program)
        params = sq.regroup_ffn_channels(sq.read_params(src, PROGRAM_FILE, PARAMS_FILE), sq.ffn_blocks(desc))
        sq.write_model(dst, program, params, PROGRAM_FILE, PARAMS_FILE)
        diff = sq.check_equivalent(info.path, dst, batches[:2], PROGRAM_FILE, PARAMS_FILE)
        if not diff <= sq.EQUIVALENCE_TOL:
            raise ConversionError(f"reordering the FFN channels changed the fp32 outputs by {diff:.3g}")
        record["ffn_channels_regrouped"] = {"blocks": len(sq.ffn_blocks(desc)), "max_abs_fp32_output_diff": diff}
    return record


def _calibrate(src: Path, batches: list[dict[str, np.ndarray]], out_dir: Path, qs: QuantSettings) -> None:
    """PaddleSlim `quant_post_static` of the program in `src` into `out_dir`."""
    import logging

    import paddle
    from paddle.base.proto import framework_pb2
    from paddleslim.quant import quant_post_static

    # The weights stay fp32 in the saved program: Paddle's oneDNN pass quantises them itself,
    # so weights PaddleSlim had already rounded would be rounded twice (measured: about twice the
    # gate loss). PaddleSlim only calibrates the activation ranges.
    desc = framework_pb2.ProgramDesc.FromString((src / PROGRAM_FILE).read_bytes())
    kwargs = {"skip_tensor_list": _matmul_weights(desc)}
    for lname, lg in list(logging.root.manager.loggerDict.items()):  # PaddleSlim's per-step INFO log
        if isinstance(lg, logging.Logger) and ("quant" in lname or lname.startswith("paddleslim")):
            lg.setLevel(logging.WARNING)
    paddle.enable_static()
    try:
        exe = paddle.static.Executor(paddle.CPUPlace())
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
            quant_post_static(
                executor=exe, model_dir=str(src), quantize_model_path=str(out_dir),
                data_loader=_feed_loader(batches), batch_nums=len(batches),
                model_filename=PROGRAM_FILE, params_filename=PARAMS_FILE,
                save_model_filename=PROGRAM_FILE, save_params_filename=PARAMS_FILE,
                algo=qs.algo, hist_percent=qs.hist_percent,
                quantizable_op_type=list(qs.quantizable_op_type), weight_quantize_type=qs.weight_quantize_type,
                weight_bits=qs.weight_bits, activation_bits=qs.activation_bits,
                onnx_format=True, is_full_quantize=False, **kwargs)
    finally:
        paddle.disable_static()


def _matmul_weights(desc) -> list[str]:
    """The parameters every matmul_v2 multiplies by: the Linears' weights and those of any
    fp32 side path (smoothquant outlier channels), which PaddleSlim must leave unrounded."""
    block = desc.blocks[0]
    params = {v.name for v in block.vars if v.persistable}
    return [a for op in block.ops if op.type == "matmul_v2" for v in op.inputs if v.parameter == "Y"
            for a in v.arguments if a in params]


def _check_target(model_dir: Path, out: Path, force: bool) -> None:
    """Refuse an `out` that exists (without `force`) or is the source itself."""
    if out.exists() and not force:
        raise ConversionError(f"{out} exists; pass --force to overwrite it")
    if out.resolve() == model_dir.resolve():
        raise ConversionError(f"--out {out} is the source model itself; choose another directory")


def _load_source(model_dir: Path) -> ModelInfo:
    """The source runtime model: fp32 and the CPU (fused QKV) export, the only ones int8 runs from."""
    info = load_model_info(model_dir)
    if info.precision != "fp32":
        raise ConversionError(f"{model_dir} has precision {info.precision!r}; quantise an fp32 model")
    if info.attention != "fused_qkv":
        raise ConversionError(f"{model_dir} is a `convert --target gpu` export; int8 runs on the CPU only, so "
                              f"quantise the CPU export of the checkpoint (convert without --target gpu)")
    return info


def _require_paddleslim() -> None:
    try:
        import paddleslim  # noqa: F401
    except ImportError as e:
        raise ConversionError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e


def _split_rows(rows: Rows) -> tuple[Rows, Rows]:
    """(calibration rows, held-out gate rows), split by qid; both halves must hold rows."""
    held = held_out_mask(rows.qid)
    if held.all() or not held.any():
        raise ConversionError(f"the --calib rows hold {len(set(rows.qid))} distinct qid(s), all in one half of "
                              f"the qid split; calibration and the held-out gate need more queries")
    return rows.take(np.flatnonzero(~held)), rows.take(np.flatnonzero(held))


def _copy_side_files(info: ModelInfo, dst: Path) -> None:
    """The source's other files (vocab, id map of a pruned model, ...) into the int8 directory."""
    for f in info.path.iterdir():
        if f.is_file() and f.name not in (PROGRAM_FILE, PARAMS_FILE, MODEL_JSON, PARAMS_FILE + ".info"):
            shutil.copyfile(f, dst / f.name)


def _quantization_record(info: ModelInfo, settings: QuantSettings, files: Sequence[Path], rows: Rows,
                         calib_rows: Rows, gate_rows: Rows, batches: list[dict[str, np.ndarray]],
                         seconds: float, rewrite: dict | None = None) -> dict:
    """model.json "quantization" of the int8 copy of `info`, before the gate result is added."""
    from importlib.metadata import version

    import paddle

    return {
        "method": {"tool": f"paddleslim {version('paddleslim')} quant_post_static", **settings.record(),
                   "onnx_format": True, "rewrite": rewrite},
        "source_path": str(info.path.resolve()),
        "source_params_sha256": sha256_file(info.params_file),
        "calibration": {
            "files": [{"file": str(f.resolve()), "sha256": sha256_file(f)} for f in files],
            "rows": len(rows), "calibration_rows": len(calib_rows), "held_out_rows": len(gate_rows),
            "split": "held out: rows whose sha1(qid) first byte is odd",
            "sequences": int(sum(len(b["input_ids"]) for b in batches)), "batches": len(batches),
            "seconds": round(seconds, 2),
        },
        "onednn_int8_ops": list(settings.onednn_int8_ops),
        "quantized_by": f"pipeline {__version__}, paddle {paddle.__version__}",
    }


def _write_gated(stage: Path, meta: dict, info: ModelInfo, gate_rows: Rows, max_loss_rate: float,
                 threads: int) -> GateResult:
    """Write model.json into `stage`, gate the staged int8 model against `info` on the held-out
    rows, and write it again with the gate result ("quantization.gate"), each time read back."""
    _write_meta(stage, meta)
    int8_info = load_model_info(stage)
    gate = evaluate_gate(info, int8_info, gate_rows, max_loss_rate, threads)
    meta["quantization"]["gate"] = asdict(gate)
    _write_meta(stage, meta)
    load_model_info(stage)
    return gate


def quantize(model_dir: str | Path, calib: Sequence[str | Path], out: str | Path, force: bool = False,
             columns: ColumnMap = ColumnMap(), name: str | None = None, settings: QuantSettings = QuantSettings(),
             max_loss_rate: float = DEFAULT_MAX_LOSS_RATE, threads: int | None = None,
             log=print) -> tuple[Path | None, GateResult]:
    """Quantise runtime model `model_dir` to int8 into `out`, calibrated on half of `calib` and
    gated on the other half. Returns (out or None when the gate failed without force, gate)."""
    import zlib  # noqa: F401 - must precede paddle 2.6's first import (it breaks zlib otherwise)

    model_dir, out = Path(model_dir), Path(out)
    _check_target(model_dir, out, force)
    info = _load_source(model_dir)
    _require_paddleslim()
    threads = threads or len(os.sched_getaffinity(0))
    files = list_input_files(calib)
    rows = read_rows(files, columns)
    calib_rows, gate_rows = _split_rows(rows)
    text = TextEncoder(TextEncoderSpec.of(info))
    batches = calibration_batches(encode_rows(text, info, calib_rows, info.max_seq_len), text.pad_id, settings)
    log(f"calibrating on {sum(len(b['input_ids']) for b in batches)} sequences of {len(calib_rows)} rows "
        f"({len(batches)} batches); gate on {len(gate_rows)} held-out rows")

    with staged_dir(out) as stage:
        t0 = time.perf_counter()
        rewrite = quantize_program(info, batches, stage.path, settings)
        quant_seconds = time.perf_counter() - t0
        _copy_side_files(info, stage.path)
        meta = derived_meta(info, drop=("quantization",))
        meta["name"] = name or f"{info.name}-int8"
        meta["precision"] = "int8"
        meta["quantization"] = _quantization_record(info, settings, files, rows, calib_rows, gate_rows,
                                                    batches, quant_seconds, rewrite)
        gate = _write_gated(stage.path, meta, info, gate_rows, max_loss_rate, threads)
        if not gate.passed and not force:
            stage.discard()
    if not gate.passed and not force:
        return None, gate
    return out, gate


def _write_meta(d: Path, meta: dict) -> None:
    write_model_json(d, meta, json_default=_json_default)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))
