"""int8 Linears for a decoder directory (`python -m pipeline quantize DECODER_DIR --calib PROMPTS --out DIR`).

What makes Paddle 2.6.2 run int8 GEMMs for the decoder's Linears on the CPU (the encoder's path,
convert/quantize.py, adapted):

1. **fc ops.** oneDNN's int8 Linear in Paddle Inference is the `fc` op (`enable_mkldnn_int8({"fc"})`,
   inner_product u8s8/s8s8). Paddle's passes make an `fc` from matmul_v2 [x, W] + elementwise_add
   [bias] only: the Llama block's Linears have no bias, so their matmul_v2 ops would stay
   matmul_v2 / fused_matmul, which the int8 passes leave in fp32. `add_zero_biases` gives every
   Linear (q, k, v, o, gate, up, down of every layer) a zero bias in both programs; the outputs
   do not change (x + 0). The output head (matmul_v2 with the tied embedding, trans_y) stays
   fp32: an fc needs an [in, out] weight, the embedding is [vocab, in].
2. **Activation scales.** PaddleSlim's `quant_post_static` (abs_max, quantize/dequantize ops in
   the ONNX format, weights left fp32 so that Paddle's oneDNN pass quantises them itself per
   output channel) calibrates the prefill program on real prompts. The decode program's Linears
   see the same hidden states one position at a time, so it gets the same scales: the
   quantize/dequantize pairs of the calibrated prefill program are copied in front of the
   decode program's Linears with the same Scale / ZeroPoint variables (matched by weight
   name), and both programs keep ONE params file (the same persistable set). Pairs PaddleSlim
   put on the attention matmuls (activation x activation) are removed: those stay fp32.
3. The directory's model.json says `"precision": "int8"`; the predictor then turns on the IR
   passes for both programs and `enable_mkldnn_int8({"fc"})`.

The int8 copy is gated (convert/generation_gate.py: ROUGE-L and BLEU of greedy outputs against
the fp32 model's, each within `max_loss_rate`) and not written when the gate fails, unless
`force` (then recorded as failing).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline import __version__
from pipeline.convert.errors import ConversionError
from pipeline.engine.decoder_io import DECODE_PROGRAM, PARAMS_FILE, PREFILL_PROGRAM
from pipeline.engine.decoder_modeldir import TOKENIZER_FILE, DecoderModelInfo

BIAS_SUFFIX = ".int8_zero_bias"
INT8_OPS = ("fc",)
CALIB_PROMPTS = 32  # prompts fed to calibration, at most
INSTALL_HINT = "int8 quantisation needs PaddleSlim: pip install -r requirements-quant.txt"


def _vocab_rows(block) -> set[int]:
    """The row counts of the embedding tables (lookup_table_v2 weights): a Linear this wide is the
    output head."""
    rows = set()
    for op in block.ops:
        if op.type in ("lookup_table_v2", "lookup_table", "embedding"):
            v = block._find_var_recursive(op.input("W")[0])
            if v is not None and len(v.shape) == 2:
                rows.add(int(v.shape[0]))
    return rows


def weight_linears(block, fp32_in: frozenset = frozenset()) -> list:
    """The decoder layers' Linear matmul_v2 ops of a block (a `paddle.static` Block): a persistable
    2-D weight as Y, not transposed. The output head stays fp32 whichever way it was exported:
    tied (trans_y on the embedding) or as its own [hidden, vocab] weight, because int8 logits
    move greedy choices (the last attempt's failure) and the head is not a layer Linear. Linears whose
    input width is in `fp32_in` stay fp32 too (the FFN output, down_proj: its input is the FFN width)."""
    vocab = _vocab_rows(block)
    out = []
    for op in block.ops:
        if op.type != "matmul_v2" or op.attr("trans_x") or op.attr("trans_y"):
            continue
        y = op.input("Y")[0]
        v = block._find_var_recursive(y)
        if (v is not None and v.persistable and len(v.shape) == 2 and int(v.shape[1]) not in vocab
                and int(v.shape[0]) not in fp32_in):
            out.append(op)
    return out


FP32_LINEAR_KINDS = ("down",)  # Linears `quantize --fp32-linears` can keep fp32


def fp32_in_features(info: DecoderModelInfo, kinds: Sequence[str]) -> frozenset:
    """The input widths of the Linear kinds kept fp32: down (the FFN output, down_proj) reads the
    FFN width (intermediate_size), which no other Linear of a Llama block does."""
    bad = set(kinds) - set(FP32_LINEAR_KINDS)
    if bad:
        raise ConversionError(f"--fp32-linears for decoders takes {', '.join(FP32_LINEAR_KINDS)}; got {sorted(bad)}")
    ffn = int(info.architecture["intermediate_size"])
    if "down" in kinds and ffn == info.hidden_size:
        raise ConversionError("down_proj cannot be told from the other Linears (intermediate_size == hidden_size)")
    return frozenset({ffn} if "down" in kinds else ())


def add_zero_biases(program, params: dict[str, np.ndarray], fp32_in: frozenset = frozenset()) -> int:
    """matmul_v2(x, W) -> elementwise_add(matmul_v2(x, W), 0) for every Linear, so Paddle's fc
    fuse pass makes an fc of it; adds the zero biases to `params`; returns how many."""
    block = program.global_block()
    n = 0
    for op in weight_linears(block, fp32_in):
        w = op.input("Y")[0]
        out = op.output("Out")[0]
        bias, raw = w + BIAS_SUFFIX, out + ".nobias"
        width = int(params[w].shape[1])
        block.create_var(name=bias, shape=[width], dtype="float32", persistable=True)
        ov = block.var(out)
        block.create_var(name=raw, shape=ov.shape, dtype=ov.dtype, persistable=False)
        at = list(block.ops).index(op)
        op._rename_output(out, raw)
        block._insert_op(at + 1, type="elementwise_add", inputs={"X": [raw], "Y": [bias]}, outputs={"Out": [out]},
                         attrs={"axis": -1})
        params[bias] = np.zeros(width, np.float32)
        n += 1
    return n


def _quant_pairs(block) -> dict[str, tuple]:
    """{dequantized var: (quantize op, dequantize op)} of the quantize_linear -> dequantize_linear pairs."""
    q_by_out = {op.output("Y")[0]: op for op in block.ops if op.type == "quantize_linear"}
    pairs = {}
    for op in block.ops:
        if op.type == "dequantize_linear" and op.input("X")[0] in q_by_out:
            pairs[op.output("Y")[0]] = (q_by_out[op.input("X")[0]], op)
    return pairs


def keep_linear_pairs(program, fp32_in: frozenset = frozenset()) -> dict[str, dict]:
    """Drop the quantize/dequantize pairs that feed anything but a Linear (their readers read the
    fp32 tensor again); returns, per Linear weight, the pair in front of it: its Scale and
    ZeroPoint variable names and the ops' attributes."""
    block = program.global_block()
    pairs = _quant_pairs(block)
    linears = {op.input("X")[0]: op for op in weight_linears(block, fp32_in)}
    by_weight: dict[str, dict] = {}
    for op in weight_linears(block, fp32_in):
        x = op.input("X")[0]
        if x in pairs:
            q, dq = pairs[x]
            by_weight[op.input("Y")[0]] = {
                "scale": q.input("Scale")[0], "zero_point": q.input("ZeroPoint")[0],
                # PaddleSlim gives the dequantize op a ZeroPoint (and maybe Scale) variable of its own
                "dq_scale": dq.input("Scale")[0], "dq_zero_point": dq.input("ZeroPoint")[0],
                "q_attrs": {k: q.attr(k) for k in q.attr_names if not k.startswith("op_")},
                "dq_attrs": {k: dq.attr(k) for k in dq.attr_names if not k.startswith("op_")}}
    drop = [(x, q, dq) for x, (q, dq) in pairs.items() if x not in linears]
    dead_vars = set()
    for x, q, dq in drop:
        src = q.input("X")[0]
        for op in block.ops:
            if x in op.input_arg_names:
                op._rename_input(x, src)
        dead_vars |= {q.output("Y")[0], x}
        dead_vars |= {q.input("Scale")[0], q.input("ZeroPoint")[0], dq.input("Scale")[0], dq.input("ZeroPoint")[0]}
        for o in (dq, q):
            block._remove_op(list(block.ops).index(o))
    used = {n for op in block.ops for n in op.input_arg_names + op.output_arg_names}
    for v in dead_vars - used:
        block._remove_var(v)
    return by_weight


def add_linear_pairs(program, by_weight: dict[str, dict], scale_vars: dict[str, tuple],
                     fp32_in: frozenset = frozenset()) -> int:
    """Put a quantize/dequantize pair in front of every Linear of `program` whose weight has one in
    `by_weight` (shared by Linears reading the same input, as q, k, v do); `scale_vars` gives the
    shape and dtype of each Scale / ZeroPoint variable. Returns the pairs added."""
    block = program.global_block()
    done: dict[tuple[str, str], str] = {}  # (input, Scale variable) -> the dequantized input
    added = 0
    for op in weight_linears(block, fp32_in):
        w = op.input("Y")[0]
        if w not in by_weight:
            continue
        x = op.input("X")[0]
        rec = by_weight[w]
        key = (x, rec["scale"])
        if key not in done:
            for name in (rec["scale"], rec["zero_point"], rec["dq_scale"], rec["dq_zero_point"]):
                if not block.has_var(name):
                    shape, dtype = scale_vars[name]
                    block.create_var(name=name, shape=shape, dtype=dtype, persistable=True)
            xv = block.var(x)
            qn, dqn = f"{x}.quantized.{added}", f"{x}.dequantized.{added}"
            block.create_var(name=qn, shape=xv.shape, dtype=xv.dtype, persistable=False)
            block.create_var(name=dqn, shape=xv.shape, dtype=xv.dtype, persistable=False)
            at = list(block.ops).index(op)
            block._insert_op(at, type="quantize_linear",
                             inputs={"X": [x], "Scale": [rec["scale"]], "ZeroPoint": [rec["zero_point"]]},
                             outputs={"Y": [qn]}, attrs=rec["q_attrs"])
            block._insert_op(at + 1, type="dequantize_linear",
                             inputs={"X": [qn], "Scale": [rec["dq_scale"]], "ZeroPoint": [rec["dq_zero_point"]]},
                             outputs={"Y": [dqn]}, attrs=rec["dq_attrs"])
            done[key] = dqn
            added += 1
        op._rename_input(x, done[key])
    return added


def calibration_batches(info: DecoderModelInfo, files: Sequence[Path], limit: int = CALIB_PROMPTS,
                        chat: bool = False) -> list[dict[str, np.ndarray]]:
    """Prefill feeds of up to `limit` prompts of `files`, one prompt per batch (no padding), as
    `generate` tokenizes them (chat template, prompt limit)."""
    from pipeline.engine.prompt_text import PromptEncoderSpec
    from pipeline.engine.text import TokenizeRequest
    from pipeline.io.prompts import PromptReader
    from pipeline.io.reader import ColumnMap

    max_prompt = min(512, info.max_seq_len - 1)
    enc = PromptEncoderSpec.of(info, max_prompt, "truncate", chat).build()
    reader = PromptReader(list(files), ColumnMap(), chunk_rows=64)
    ids: list = []
    for chunk, _ in reader.chunks():
        if chunk is None or not len(chunk):
            continue
        kind, data = ("messages", chunk.messages) if chunk.messages is not None else ("prompts", chunk.prompt)
        ids += enc.run(TokenizeRequest(kind, max_prompt, data)).ids
        if len(ids) >= limit:
            break
    if not ids:
        raise ConversionError(f"no usable prompts in {[str(f) for f in files]} to calibrate with")
    out = []
    for p in ids[:limit]:
        n = len(p)
        out.append({"input_ids": np.asarray([p], np.int64), "position_ids": np.arange(n, dtype=np.int64)[None],
                    "attention_mask": np.ones((1, n), np.float32)})
    return out


def _calibrate(src: Path, batches: list[dict[str, np.ndarray]], out: Path, weights: list[str]) -> None:
    import logging

    import paddle
    from paddleslim.quant import quant_post_static

    from pipeline.convert.quantize import _feed_loader

    for lname, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and ("quant" in lname or lname.startswith("paddleslim")):
            lg.setLevel(logging.WARNING)
    paddle.enable_static()
    try:
        exe = paddle.static.Executor(paddle.CPUPlace())
        with contextlib.redirect_stderr(io.StringIO()):
            quant_post_static(
                executor=exe, model_dir=str(src), quantize_model_path=str(out), data_loader=_feed_loader(batches),
                batch_nums=len(batches), model_filename=PREFILL_PROGRAM, params_filename=PARAMS_FILE,
                save_model_filename=PREFILL_PROGRAM, save_params_filename=PARAMS_FILE, algo="abs_max",
                quantizable_op_type=["matmul_v2"], weight_quantize_type="channel_wise_abs_max",
                onnx_format=True, is_full_quantize=False, skip_tensor_list=weights)
    finally:
        paddle.disable_static()


def write_int8_programs(info: DecoderModelInfo, batches: list[dict[str, np.ndarray]], dst: Path,
                        fp32_linears: Sequence[str] = ()) -> dict:
    """The int8 prefill and decode programs and their one params file in `dst` (see the module
    docstring); returns what was done."""
    import paddle

    from pipeline.convert.export import add_transpose_xshape
    from pipeline.convert.smoothquant import read_params, write_model

    src = info.path
    fp32_in = fp32_in_features(info, fp32_linears)
    params = read_params(src, PREFILL_PROGRAM, PARAMS_FILE)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=dst.parent) as tmp:
        biased, calibrated = Path(tmp) / "biased", Path(tmp) / "calibrated"
        paddle.enable_static()
        try:
            programs, counts = {}, {}
            for name in (PREFILL_PROGRAM, DECODE_PROGRAM):
                prog = paddle.static.Program.parse_from_string((src / name).read_bytes())
                counts[name] = add_zero_biases(prog, params, fp32_in)
                programs[name] = prog
            biased_bytes = {n: p.desc.serialize_to_string() for n, p in programs.items()}
        finally:
            paddle.disable_static()
        write_model(biased, biased_bytes[PREFILL_PROGRAM], params, PREFILL_PROGRAM, PARAMS_FILE)
        weights = sorted({w for w in params if not w.endswith(BIAS_SUFFIX) and params[w].ndim == 2})
        t0 = time.perf_counter()
        _calibrate(biased, batches, calibrated, weights)
        calib_s = time.perf_counter() - t0
        # PaddleSlim names the params file after the program (prefill.pdiparams), whatever it is told
        cal_file = next((f for f in ("prefill.pdiparams", PARAMS_FILE) if (calibrated / f).is_file()), None)
        if cal_file is None:
            raise ConversionError(f"PaddleSlim wrote no params file: {sorted(p.name for p in calibrated.iterdir())}")
        cal_params = read_params(calibrated, PREFILL_PROGRAM, cal_file)
        paddle.enable_static()
        try:
            pre = paddle.static.Program.parse_from_string((calibrated / PREFILL_PROGRAM).read_bytes())
            by_weight = keep_linear_pairs(pre, fp32_in)
            scale_vars = {v.name: (list(v.shape), v.dtype) for v in pre.list_vars()
                          if v.persistable and v.name not in ("feed", "fetch")}
            dec = paddle.static.Program.parse_from_string(biased_bytes[DECODE_PROGRAM])
            pairs = add_linear_pairs(dec, by_weight, scale_vars, fp32_in)
            pre_bytes, dec_bytes = pre.desc.serialize_to_string(), dec.desc.serialize_to_string()
            persist = {n: sorted(v.name for v in p.list_vars() if v.persistable and v.name not in ("feed", "fetch"))
                       for n, p in ((PREFILL_PROGRAM, pre), (DECODE_PROGRAM, dec))}
        finally:
            paddle.disable_static()
        linears = sum(counts.values()) // 2
        if len(by_weight) != linears:
            raise ConversionError(f"PaddleSlim calibrated {len(by_weight)} of the {linears} Linears of the prefill "
                                  f"program; the others would silently run fp32")
        if persist[PREFILL_PROGRAM] != persist[DECODE_PROGRAM]:
            a, b = set(persist[PREFILL_PROGRAM]), set(persist[DECODE_PROGRAM])
            raise ConversionError(f"the int8 prefill and decode programs hold different parameters (prefill only: "
                                  f"{sorted(a - b)[:6]}, decode only: {sorted(b - a)[:6]}); they must share one "
                                  f"params file")
        keep = {n: cal_params[n] for n in persist[PREFILL_PROGRAM]}
        write_model(dst, pre_bytes, keep, PREFILL_PROGRAM, PARAMS_FILE)
        (dst / DECODE_PROGRAM).write_bytes(dec_bytes)
        add_transpose_xshape(dst / PREFILL_PROGRAM)
        # PaddleSlim saves its program with generated fetch names (save_infer_model/scale_i, a
        # scale-by-1 op after each named output); the predictor fetches logits / present_* by name
        fetch_named_outputs(dst / PREFILL_PROGRAM)
        got, want = _fetch_names(dst / PREFILL_PROGRAM), _fetch_names(src / PREFILL_PROGRAM)
        if got != want:
            raise ConversionError(f"the int8 prefill program fetches {got[:3]}..., the fp32 one {want[:3]}...")
    return {"linears_int8": linears, "fp32_linears": list(fp32_linears), "zero_biases_added": counts, "decode_pairs_added": pairs,
            "calibration_seconds": round(calib_s, 1), "calibration_prompts": len(batches)}


def _fetch_names(program_file: Path) -> list[str]:
    from paddle.base.proto import framework_pb2

    from pipeline.convert.decoder_export import fetch_names

    return fetch_names(framework_pb2.ProgramDesc.FromString(Path(program_file).read_bytes()))


def fetch_named_outputs(program_file: Path) -> None:
    """Fetch the variables that `save_infer_model/scale_i` ops copy (scale 1, bias 0) and drop
    those ops, so the program's outputs carry their own names again."""
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc.FromString(Path(program_file).read_bytes())
    block = desc.blocks[0]
    copies = {}
    for i, op in enumerate(block.ops):
        out = [a for o in op.outputs for a in o.arguments]
        if op.type == "scale" and len(out) == 1 and out[0].startswith("save_infer_model/"):
            copies[out[0]] = (i, next(x for x in op.inputs if x.parameter == "X").arguments[0])
    for op in block.ops:
        if op.type == "fetch":
            slot = next(x for x in op.inputs if x.parameter == "X")
            slot.arguments[:] = [copies[a][1] if a in copies else a for a in slot.arguments]
    for i in sorted((i for i, _ in copies.values()), reverse=True):
        del block.ops[i]
    keep = [v for v in block.vars if v.name not in copies]
    del block.vars[:]
    block.vars.extend(keep)
    Path(program_file).write_bytes(desc.SerializeToString())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def quantize_decoder(model_dir: str | Path, calib: Sequence[str | Path], out: str | Path, *, force: bool = False,
                     max_loss_rate: float = 0.01, threads: int | None = None, gate_data: Sequence[str | Path] = (),
                     max_new_tokens: int = 64, calib_prompts: int = CALIB_PROMPTS, name: str | None = None,
                     fp32_linears: Sequence[str] = ()):
    """The gated int8 copy of an fp32 decoder directory; returns (out path, gate result)."""
    from pipeline.convert.generation_gate import GateCandidate, GateDecoding, gate_record, run_generation_gate
    from pipeline.engine.modeldir import load_model_info
    from pipeline.io.reader import list_input_files

    try:
        import paddleslim  # noqa: F401
    except ImportError as e:
        raise ConversionError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    model_dir, out = Path(model_dir), Path(out)
    info = load_model_info(model_dir)
    if not isinstance(info, DecoderModelInfo) or info.precision != "fp32":
        raise ConversionError(f"{model_dir} is not an fp32 decoder directory")
    if out.exists() and not force:
        raise ConversionError(f"{out} exists; pass --force to overwrite it")
    if out.resolve() == model_dir.resolve():
        raise ConversionError(f"--out {out} is the source model itself; choose another directory")
    files = list_input_files(calib)
    gate_files = list_input_files(gate_data) if gate_data else files
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        batches = calibration_batches(info, files, calib_prompts)
        done = write_int8_programs(info, batches, stage, fp32_linears)
        shutil.copy2(info.tokenizer_file, stage / TOKENIZER_FILE)
        meta = {k: v for k, v in info.meta.items() if k not in ("gates", "validation")}
        meta.update(name=name or f"{info.name}-int8", precision="int8", params_sha256=_sha256(stage / PARAMS_FILE),
                    quantization={"method": "paddleslim-ptq-abs_max, zero-bias fc, prefill scales shared with decode"
                                    + (f", fp32: {','.join(fp32_linears)}" if fp32_linears else ""),
                                  "onednn_int8_ops": list(INT8_OPS), "source_path": str(model_dir.resolve()),
                                  "source_params_sha256": info.checksum, "calibration": {
                                      "files": [{"file": str(f), "sha256": _sha256(f)} for f in files], **done},
                                  "pipeline_version": __version__})
        (stage / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        decoding = GateDecoding(max_new_tokens=max_new_tokens)
        gate = run_generation_gate(model_dir, GateCandidate(stage, "int8"), gate_files, decoding, max_loss_rate,
                                   threads=threads).result
        meta["quantization"]["gate"] = gate_record(gate, base_dir=model_dir, data=gate_files, decoding=decoding,
                                                   forced=force)
        (stage / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if not gate.passed and not force:
            return None, gate
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
        return out, gate
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
