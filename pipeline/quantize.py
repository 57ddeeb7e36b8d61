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
import hashlib
import io
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline import __version__
from pipeline.batching import pad_batch, plan_batches
from pipeline.convert import ConversionError
from pipeline.modeldir import (
    MODEL_JSON,
    PARAMS_FILE,
    PROGRAM_FILE,
    ModelInfo,
    load_id_map,
    load_model_info,
    sha256_file,
    staged_dir,
    write_model_json,
)
from pipeline.ranking import ranking_metrics
from pipeline.reader import ColumnMap, DatasetReader, list_input_files
from pipeline.tokenizer import Encoded, WordPieceTokenizer, fit_pretokenized

INSTALL_HINT = "int8 quantisation needs PaddleSlim: pip install -r requirements-quant.txt"
GATE_METRICS = ("ndcg_at_10", "pnr")
DEFAULT_MAX_LOSS_RATE = 0.01


LINEAR_KINDS = ("qkv", "attn_out", "ffn_in", "ffn_out")


@dataclass(frozen=True)
class QuantSettings:
    """How the model is quantised. The default runs int8 only the attention block's Linears (the
    QKV projection and the attention output): on the default model that passes the 1% gate on an
    AVX2 CPU without VNNI, while making the FFN Linears int8 too does not (README "int8 (CPU)")."""

    int8_linears: tuple[str, ...] = ("qkv", "attn_out")  # Linear kinds (LINEAR_KINDS) run in int8
    algo: str = "abs_max"  # activation calibration: 'abs_max' | 'avg' | 'hist' | 'KL' | 'mse' | 'emd'
    hist_percent: float = 0.9999
    weight_bits: int = 8
    activation_bits: int = 8
    quantizable_op_type: tuple[str, ...] = ("matmul_v2",)
    weight_quantize_type: str = "channel_wise_abs_max"
    onednn_int8_ops: tuple[str, ...] = ("fc",)  # ops the predictor runs in int8
    calib_sequences: int = 256  # sequences fed to calibration (at most)
    calib_batch_size: int = 32
    max_batch_tokens: int = 8192  # batches of the calibration and gate runs

    def __post_init__(self) -> None:
        unknown = set(self.int8_linears) - set(LINEAR_KINDS)
        assert self.int8_linears and not unknown, (
            f"int8_linears must be a non-empty subset of {LINEAR_KINDS}, got {self.int8_linears}")


@dataclass
class GateResult:
    fp32: dict
    int8: dict
    loss_rate: dict
    max_abs_score_diff: float
    max_loss_rate: float
    passed: bool
    rows: int
    queries: int
    sequences: int
    seconds: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- data


@dataclass
class Rows:
    qid: list[str]
    doc_id: list[str]
    label: np.ndarray
    query: list[str] | None
    doc: list[str] | None
    input_ids: list | None
    token_type_ids: list | None

    def take(self, idx: np.ndarray) -> "Rows":
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Rows(pick(self.qid), pick(self.doc_id), self.label[idx], pick(self.query), pick(self.doc),
                    pick(self.input_ids), pick(self.token_type_ids))

    def __len__(self) -> int:
        return len(self.qid)


def read_rows(files: Sequence[Path], columns: ColumnMap) -> Rows:
    reader = DatasetReader(files, columns)
    parts = [c for c, _ in reader.chunks() if c is not None and len(c)]
    if not parts:
        raise ConversionError(f"no usable rows in {[str(f) for f in files]}")
    cat = lambda name: None if getattr(parts[0], name) is None else [x for c in parts for x in getattr(c, name)]  # noqa: E731
    label = (np.concatenate([c.label for c in parts]) if parts[0].label is not None
             else np.full(sum(len(c) for c in parts), np.nan))
    return Rows(cat("qid"), cat("doc_id"), label.astype(np.float64), cat("query"), cat("doc"),
                cat("input_ids"), cat("token_type_ids"))


def held_out_mask(qid: Sequence[str]) -> np.ndarray:
    """True for rows of the held-out half: decided per query by sha1(qid), so it is the same on
    every machine and run, and a query's rows are never split between the halves."""
    return np.array([hashlib.sha1(q.encode("utf-8")).digest()[0] & 1 == 1 for q in qid], dtype=bool)


def encode_rows(info: ModelInfo, rows: Rows) -> tuple[Encoded, np.ndarray | None, np.ndarray | None]:
    """The sequences the model sees for `rows`, as `run` builds them. cross: one pair per row
    (returns enc, None, None); bi: each distinct text once (returns enc, query slot, doc slot)."""
    tok = WordPieceTokenizer(info.vocab_file, info.tokenizer)
    q_slot = d_slot = None
    if rows.query is None:
        if info.mode != "cross":
            raise ConversionError("pre-tokenized calibration data fits cross models only; bi models need "
                                  "query and doc text columns")
        enc, _ = fit_pretokenized(rows.input_ids, rows.token_type_ids, info.max_seq_len, tok.sep_id)
    elif info.mode == "cross":
        enc = tok.encode_pairs(rows.query, rows.doc, info.max_seq_len)
    else:
        texts = list(dict.fromkeys(rows.query + rows.doc))
        slot = {t: i for i, t in enumerate(texts)}
        q_slot = np.array([slot[t] for t in rows.query], dtype=np.int64)
        d_slot = np.array([slot[t] for t in rows.doc], dtype=np.int64)
        enc = tok.encode_single(texts, info.max_seq_len)
    if info.id_map_file is not None:  # pruned model: full-vocab ids -> rows of its table
        id_map = load_id_map(info.id_map_file)
        enc.ids.flat = id_map[np.minimum(enc.ids.flat, len(id_map) - 1)]
    return enc, q_slot, d_slot


def _subset(enc: Encoded, idx: np.ndarray) -> Encoded:
    return Encoded(enc.ids.take(idx), enc.types.take(idx))


def calibration_batches(enc: Encoded, pad_id: int, qs: QuantSettings) -> list[dict[str, np.ndarray]]:
    """At most `calib_sequences` sequences, spread evenly over the calibration half, in
    length-sorted padded batches (the shapes `run` produces)."""
    n = len(enc)
    if n > qs.calib_sequences:
        enc = _subset(enc, np.linspace(0, n - 1, qs.calib_sequences).round().astype(np.int64))
    out = []
    for b in plan_batches(enc.lengths, qs.max_batch_tokens, qs.calib_batch_size):
        ids, types, mask = pad_batch(enc, b, pad_id)
        out.append({"input_ids": ids, "token_type_ids": types, "attention_mask": mask})
    return out


def infer(predictor, enc: Encoded, pad_id: int, max_batch_tokens: int, max_batch_size: int = 64) -> np.ndarray:
    out = None
    for b in plan_batches(enc.lengths, max_batch_tokens, max_batch_size):
        res = predictor.run(*pad_batch(enc, b, pad_id))
        if out is None:
            out = np.empty((len(enc),) + res.shape[1:], dtype=np.float64)
        out[b.rows] = res
    return out


def scores_of(info: ModelInfo, outputs: np.ndarray, q_slot, d_slot) -> np.ndarray:
    if info.mode == "cross":
        return outputs.reshape(len(outputs), -1)[:, 0] if outputs.ndim > 1 else outputs
    return np.einsum("ij,ij->i", outputs[q_slot], outputs[d_slot])


# ----------------------------------------------------------------------------- the gate


def loss_rate(fp32: float | None, int8: float | None) -> float | None:
    if fp32 is None or int8 is None:
        return None
    if fp32 == 0:
        return 0.0 if int8 == 0 else float("inf")
    return abs(fp32 - int8) / abs(fp32)


def evaluate_gate(fp32_info: ModelInfo, int8_info: ModelInfo, rows: Rows, enc: Encoded, q_slot, d_slot,
                  max_loss_rate: float, threads: int, max_batch_tokens: int) -> GateResult:
    from pipeline.predictor import PaddlePredictor, PredictorSettings

    tok_pad = WordPieceTokenizer(fp32_info.vocab_file, fp32_info.tokenizer).pad_id
    metrics, scores, seconds = {}, {}, {}
    for name, info in (("fp32", fp32_info), ("int8", int8_info)):
        pred = PaddlePredictor(info, PredictorSettings(threads=threads))
        t0 = time.perf_counter()
        out = infer(pred, enc, tok_pad, max_batch_tokens)
        seconds[name] = round(time.perf_counter() - t0, 3)
        scores[name] = scores_of(info, out, q_slot, d_slot)
        metrics[name] = ranking_metrics(np.array(rows.qid), np.array(rows.doc_id), rows.label,
                                        scores[name]).to_dict()
        del pred
    rates = {m: loss_rate(metrics["fp32"][m], metrics["int8"][m]) for m in GATE_METRICS}
    if any(metrics["fp32"][m] is None for m in GATE_METRICS):
        raise ConversionError(
            f"the held-out calibration rows define no {' / '.join(GATE_METRICS)} (metrics {metrics['fp32']}): "
            f"the gate needs labelled queries with at least one relevant and one non-relevant doc; "
            f"give --calib files with a label column")
    passed = all(r is not None and r <= max_loss_rate for r in rates.values())
    return GateResult(
        fp32=metrics["fp32"], int8=metrics["int8"], loss_rate=rates,
        max_abs_score_diff=float(np.max(np.abs(scores["fp32"] - scores["int8"]))) if len(rows) else 0.0,
        max_loss_rate=max_loss_rate, passed=passed, rows=len(rows), queries=len(set(rows.qid)),
        sequences=len(enc), seconds=seconds)


# ----------------------------------------------------------------------------- quantising


def linear_layers(desc) -> list[tuple[str, str, str]]:
    """(kind, input name, weight name) of every Linear (matmul_v2 with a parameter as Y) of a
    program, in program order; the input name is the raw activation, before any quantize /
    dequantize pair. The kind comes from what produces that input, which holds for any post-LN
    ERNIE/BERT export whether Q, K and V are fused or separate: GELU -> 'ffn_out'; the
    reshape/transpose of the attention context -> 'attn_out'; a layer norm -> 'qkv' before the
    layer's attention output and 'ffn_in' after it; anything else -> 'head' (the pooler and the
    classifier of a cross model, never quantised)."""
    block = desc.blocks[0]
    params = {v.name for v in block.vars if v.persistable}
    producer, through_qdq = {}, {}
    for op in block.ops:
        for v in op.outputs:
            for a in v.arguments:
                producer[a] = op.type
        if op.type in ("quantize_linear", "dequantize_linear"):
            x = next(v for v in op.inputs if v.parameter == "X").arguments[0]
            through_qdq[next(v for v in op.outputs if v.parameter == "Y").arguments[0]] = x

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
        fed_by = producer.get(args["X"])
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


def keep_int8_inputs(program_file: Path, kinds: Sequence[str]) -> int:
    """Leave activation quantize/dequantize pairs only on the inputs of the Linears of `kinds`;
    returns how many Linears keep them.

    Paddle's oneDNN int8 pass makes an fc int8 when its input has a scale, whatever PaddleSlim
    did to its weights (`skip_tensor_list` alone leaves every fc int8), and it carries scales
    across reshape/transpose. So every other activation pair is removed and its consumers read
    the raw tensor again; those fc then have no input scale and stay fp32."""
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc.FromString(program_file.read_bytes())
    block = desc.blocks[0]
    keep = {x for kind, x, _ in linear_layers(desc) if kind in kinds}
    raw_of_quantized, raw_of, drop = {}, {}, set()
    for i, op in enumerate(block.ops):
        ins = {v.parameter: v.arguments[0] for v in op.inputs if v.arguments}
        outs = {v.parameter: v.arguments[0] for v in op.outputs if v.arguments}
        if op.type == "quantize_linear" and ins["X"] not in keep:
            raw_of_quantized[outs["Y"]] = ins["X"]
            drop.add(i)
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
    return sum(1 for kind, _, _ in linear_layers(desc) if kind in kinds)


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
                     qs: QuantSettings) -> None:
    """PaddleSlim PTQ of `info`'s program into `out_dir` (inference.pdmodel + .pdiparams)."""
    try:
        import paddle
        from paddleslim.quant import quant_post_static
    except ImportError as e:
        raise ConversionError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    import logging

    from paddle.base.proto import framework_pb2

    # The weights stay fp32 in the saved program: Paddle's oneDNN pass quantises them itself per
    # output channel, so weights PaddleSlim had already rounded would be rounded twice (measured:
    # about twice the gate loss). PaddleSlim only calibrates the activation ranges.
    desc = framework_pb2.ProgramDesc.FromString(info.program_file.read_bytes())
    kwargs = {"skip_tensor_list": [w for _, _, w in linear_layers(desc)]}
    for lname, lg in list(logging.root.manager.loggerDict.items()):  # PaddleSlim's per-step INFO log
        if isinstance(lg, logging.Logger) and ("quant" in lname or lname.startswith("paddleslim")):
            lg.setLevel(logging.WARNING)
    paddle.enable_static()
    try:
        exe = paddle.static.Executor(paddle.CPUPlace())
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
            quant_post_static(
                executor=exe, model_dir=str(info.path), quantize_model_path=str(out_dir),
                data_loader=_feed_loader(batches), batch_nums=len(batches),
                model_filename=PROGRAM_FILE, params_filename=PARAMS_FILE,
                save_model_filename=PROGRAM_FILE, save_params_filename=PARAMS_FILE,
                algo=qs.algo, hist_percent=qs.hist_percent,
                quantizable_op_type=list(qs.quantizable_op_type), weight_quantize_type=qs.weight_quantize_type,
                weight_bits=qs.weight_bits, activation_bits=qs.activation_bits,
                onnx_format=True, is_full_quantize=False, **kwargs)
    finally:
        paddle.disable_static()
    keep_int8_inputs(out_dir / PROGRAM_FILE, qs.int8_linears)


def quantize(model_dir: str | Path, calib: Sequence[str | Path], out: str | Path, force: bool = False,
             columns: ColumnMap = ColumnMap(), name: str | None = None, settings: QuantSettings = QuantSettings(),
             max_loss_rate: float = DEFAULT_MAX_LOSS_RATE, threads: int | None = None,
             log=print) -> tuple[Path | None, GateResult]:
    """Quantise runtime model `model_dir` to int8 into `out`, calibrated on half of `calib` and
    gated on the other half. Returns (out or None when the gate failed without force, gate)."""
    import zlib  # noqa: F401 - must precede paddle 2.6's first import (it breaks zlib otherwise)

    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not force:
        raise ConversionError(f"{out} exists; pass --force to overwrite it")
    if out.resolve() == model_dir.resolve():
        raise ConversionError(f"--out {out} is the source model itself; choose another directory")
    info = load_model_info(model_dir)
    if info.precision != "fp32":
        raise ConversionError(f"{model_dir} has precision {info.precision!r}; quantise an fp32 model")
    if info.raw.get("attention", "fused_qkv") != "fused_qkv":
        raise ConversionError(f"{model_dir} is a `convert --target gpu` export; int8 runs on the CPU only, so "
                              f"quantise the CPU export of the checkpoint (convert without --target gpu)")
    try:
        import paddleslim  # noqa: F401
    except ImportError as e:
        raise ConversionError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    threads = threads or len(os.sched_getaffinity(0))
    files = list_input_files(calib)
    rows = read_rows(files, columns)
    held = held_out_mask(rows.qid)
    if held.all() or not held.any():
        raise ConversionError(f"the --calib rows hold {len(set(rows.qid))} distinct qid(s), all in one half of "
                              f"the qid split; calibration and the held-out gate need more queries")
    calib_rows, gate_rows = rows.take(np.flatnonzero(~held)), rows.take(np.flatnonzero(held))
    pad_id = WordPieceTokenizer(info.vocab_file, info.tokenizer).pad_id
    calib_enc, _, _ = encode_rows(info, calib_rows)
    batches = calibration_batches(calib_enc, pad_id, settings)
    log(f"calibrating on {sum(len(b['input_ids']) for b in batches)} sequences of {len(calib_rows)} rows "
        f"({len(batches)} batches); gate on {len(gate_rows)} held-out rows")

    with staged_dir(out) as stage:
        tmp = stage.path
        t0 = time.perf_counter()
        quantize_program(info, batches, tmp, settings)
        quant_seconds = time.perf_counter() - t0
        for f in info.path.iterdir():  # vocab, id map of a pruned model, ...
            if f.is_file() and f.name not in (PROGRAM_FILE, PARAMS_FILE, MODEL_JSON, PARAMS_FILE + ".info"):
                shutil.copyfile(f, tmp / f.name)
        from importlib.metadata import version

        import paddle

        meta = {k: v for k, v in info.raw.items() if k not in ("params_sha256", "vocab_sha256", "quantization")}
        meta["name"] = name or f"{info.name}-int8"
        meta["precision"] = "int8"
        record = {
            "method": {"tool": f"paddleslim {version('paddleslim')} quant_post_static", **asdict(settings),
                       "onnx_format": True},
            "source_path": str(model_dir.resolve()),
            "source_params_sha256": sha256_file(info.params_file),
            "calibration": {
                "files": [{"file": str(f.resolve()), "sha256": sha256_file(f)} for f in files],
                "rows": len(rows), "calibration_rows": len(calib_rows), "held_out_rows": len(gate_rows),
                "split": "held out: rows whose sha1(qid) first byte is odd",
                "sequences": int(sum(len(b["input_ids"]) for b in batches)), "batches": len(batches),
                "seconds": round(quant_seconds, 2),
            },
            "onednn_int8_ops": list(settings.onednn_int8_ops),
            "quantized_by": f"pipeline {__version__}, paddle {paddle.__version__}",
        }
        meta["quantization"] = record
        _write_meta(tmp, meta)
        int8_info = load_model_info(tmp)
        gate_enc, q_slot, d_slot = encode_rows(info, gate_rows)
        gate = evaluate_gate(info, int8_info, gate_rows, gate_enc, q_slot, d_slot, max_loss_rate, threads,
                             settings.max_batch_tokens)
        record["gate"] = asdict(gate)
        _write_meta(tmp, meta)
        load_model_info(tmp)
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


def format_gate(gate: GateResult) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"gate on {gate.rows} held-out rows ({gate.queries} queries, {gate.sequences} sequences):"]
    for m in GATE_METRICS:
        r = gate.loss_rate[m]
        lines.append(f"  {m:<11} fp32 {f(gate.fp32[m])}  int8 {f(gate.int8[m])}  loss rate "
                     f"{'n/a' if r is None else f'{100 * r:.2f}%'} (limit {100 * gate.max_loss_rate:.2f}%)")
    lines.append(f"  mrr_at_10   fp32 {f(gate.fp32['mrr_at_10'])}  int8 {f(gate.int8['mrr_at_10'])}")
    lines.append(f"  max |score fp32 - score int8| = {gate.max_abs_score_diff:.4g}")
    lines.append(f"  {'PASSED' if gate.passed else 'FAILED'}")
    return "\n".join(lines)
