"""int8 post-training quantisation (issue 7) on tiny random models: the command writes an int8
model with its gate recorded in model.json, the predictor runs it with oneDNN int8 for the
quantised ops, a model failing the gate is refused unless --force (then marked failing), and an
existing output is never overwritten without --force. The gate's numbers are checked against
scores and metrics computed independently (tests/convert/test_gate.py's references)."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("paddleslim")

from pipeline.cli import main  # noqa: E402
from pipeline.convert import ConversionError  # noqa: E402
from pipeline.engine.modeldir import load_model_info, sha256_file  # noqa: E402
from pipeline.engine.predictor import PaddlePredictor, PredictorSettings, build_config  # noqa: E402
from pipeline.convert.gate import GATE_METRICS, held_out_mask, loss_rate, read_rows  # noqa: E402
from pipeline.convert.quantize import LINEAR_KINDS, QuantSettings, keep_int8_inputs, quantize  # noqa: E402
from pipeline.io.reader import ColumnMap  # noqa: E402
from tests.convert.test_gate import reference_metrics, reference_scores  # noqa: E402
from tests.sample_data import sample_rows as _sample_rows, write_tsv as _write_tsv  # noqa: E402

FAST = QuantSettings(calib_sequences=32)
# The tiny bi model's default int8 (attention Linears) loses ~0.2% NDCG@10 and ~0.5% PNR on the
# held-out rows (one pair of ~880 flips): a 5% limit passes it with a 10x margin.
BI_LIMIT = 0.05


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    rows = _sample_rows(12)
    assert held_out_mask([r["qid"] for r in rows]).any() and not held_out_mask([r["qid"] for r in rows]).all()
    return _write_tsv(tmp_path_factory.mktemp("calib") / "calib.tsv", rows)


@pytest.fixture(scope="module")
def int8_bi(tmp_path_factory, tiny_bi_dir, calib) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("q") / "bi-int8"
    dst, gate = quantize(tiny_bi_dir, [calib], out, settings=FAST, max_loss_rate=BI_LIMIT, threads=1,
                         log=lambda m: None)
    return dst, gate


def _held_out(calib: Path):
    rows = read_rows([calib], ColumnMap())
    return rows.take(np.flatnonzero(held_out_mask(rows.qid)))


def _check_gate_against_reference(gate: dict, fp32_dir: Path, int8_dir: Path, calib: Path) -> dict:
    """The recorded gate == the held-out rows scored here by both models; returns the rates."""
    held = _held_out(calib)
    s32, s8 = reference_scores(fp32_dir, held), reference_scores(int8_dir, held)
    m32 = reference_metrics(held.qid, held.doc_id, held.label, s32)
    m8 = reference_metrics(held.qid, held.doc_id, held.label, s8)
    rates = {m: abs(m32[m] - m8[m]) / m32[m] for m in GATE_METRICS}
    assert gate["rows"] == len(held) and gate["queries"] == len(set(held.qid))
    for m in GATE_METRICS:
        assert gate["fp32"][m] == pytest.approx(m32[m], rel=1e-9)
        assert gate["int8"][m] == pytest.approx(m8[m], rel=1e-9)
        assert gate["loss_rate"][m] == pytest.approx(rates[m], rel=1e-9)
        assert gate["loss_rate"][m] == pytest.approx(loss_rate(gate["fp32"][m], gate["int8"][m]))
    assert gate["max_abs_score_diff"] == pytest.approx(np.max(np.abs(s32 - s8)), abs=1e-5)
    return rates


def test_quantize_writes_an_int8_model_with_its_gate(int8_bi, tiny_bi_dir, calib):
    dst, gate = int8_bi
    assert dst is not None and gate.passed
    info = load_model_info(dst)
    assert info.precision == "int8" and info.task == "bi"
    quant = info.quantization
    assert quant.gate_passed is True and quant.int8_linears == ("qkv", "attn_out")
    assert quant.onednn_int8_ops == ("fc",)
    assert quant.source_params_sha256 == sha256_file(Path(tiny_bi_dir) / "inference.pdiparams")
    q = quant.record
    assert q["calibration"]["files"][0]["sha256"] == sha256_file(calib)
    assert q["calibration"]["calibration_rows"] + q["calibration"]["held_out_rows"] == q["calibration"]["rows"]
    g = q["gate"]
    assert g == json.loads(json.dumps(asdict(gate)))  # model.json records the gate quantize returned
    assert g["passed"] is True and g["max_loss_rate"] == BI_LIMIT
    assert g["rows"] == q["calibration"]["held_out_rows"] > 0
    rates = _check_gate_against_reference(g, tiny_bi_dir, dst, calib)
    assert all(r <= BI_LIMIT for r in rates.values())
    assert g["max_abs_score_diff"] > 0  # int8 really changed the scores: the model is not fp32 in disguise
    # the program holds one activation quantize/dequantize pair per int8 Linear (the QKV and
    # attention-output Linear of each layer) and none on weights (oneDNN quantises those itself)
    from scripts.show_program_ops import op_counts

    ops = op_counts(info.program_file)
    assert ops["quantize_linear"] == ops["dequantize_linear"] == 2 * info.num_hidden_layers


def test_int8_model_config_enables_onednn_int8_for_fc_only(int8_bi, tiny_bi_dir):
    info = load_model_info(int8_bi[0])
    cfg = build_config(info, PredictorSettings(threads=1))
    assert cfg.mkldnn_enabled() and cfg.mkldnn_int8_enabled()
    assert info.quantization.record["onednn_int8_ops"] == ["fc"] and info.quantization.onednn_int8_ops == ("fc",)
    assert not build_config(load_model_info(tiny_bi_dir), PredictorSettings(threads=1)).mkldnn_int8_enabled()
    out = PaddlePredictor(info).run(np.array([[101, 2054, 102]]), np.zeros((1, 3), np.int64), np.ones((1, 3), np.float32))
    assert out.shape == (1, 32) and np.isfinite(out).all()
    with pytest.raises(Exception, match="int8 model"):
        PaddlePredictor(info, PredictorSettings(onednn=False))


def test_failing_gate_is_refused_unless_forced(tmp_path, tiny_cross_dir, calib, capsys):
    """Every Linear of the tiny cross model in int8 reorders held-out pairs (measured: 12 of
    ~900 pairs flip, PNR -5%, NDCG@10 -0.7%), so a zero limit must fail it."""
    every = QuantSettings(int8_linears=LINEAR_KINDS, calib_sequences=32)
    out = tmp_path / "cross-int8"
    dst, gate = quantize(tiny_cross_dir, [calib], out, settings=every, max_loss_rate=0.0, threads=1,
                         log=lambda m: None)
    assert gate.loss_rate["pnr"] > 0 and gate.fp32["pairs_correct"] != gate.int8["pairs_correct"], gate
    assert dst is None and gate.passed is False and not out.exists()
    assert not [p for p in tmp_path.iterdir()], "no temporary directory left behind"
    assert main(["quantize", str(tiny_cross_dir), "--calib", str(calib), "--out", str(out), "--max-loss-rate", "0",
                 "--method", "attention", "--int8-linears", ",".join(LINEAR_KINDS), "--calib-sequences", "32",
                 "--threads", "1"]) == 2
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "not written" in captured.err and not out.exists()

    dst, forced = quantize(tiny_cross_dir, [calib], out, settings=every, max_loss_rate=0.0, threads=1,
                           force=True, log=lambda m: None)
    assert dst == out and forced.passed is False
    assert forced.loss_rate == pytest.approx(gate.loss_rate)  # the same calibration gives the same model
    info = load_model_info(dst)
    assert info.precision == "int8" and info.task == "cross"
    assert info.quantization.gate_passed is False and info.quantization.record["gate"]["passed"] is False
    rates = _check_gate_against_reference(info.quantization.record["gate"], tiny_cross_dir, dst, calib)
    assert rates["pnr"] > 0
    # and it still scores through the normal run
    run_out = tmp_path / "run"
    assert main(["run", str(calib), "--model", str(dst), "--out", str(run_out), "--no-progress", "--workers", "0",
                 "--threads", "1"]) == 0
    report = json.loads((run_out / "report.json").read_text())
    assert report["model"]["precision"] == "int8" and report["rows"]["scored"] > 0


def test_existing_output_is_not_overwritten(int8_bi, tiny_bi_dir, calib, capsys):
    dst = int8_bi[0]
    before = sha256_file(dst / "model.json")
    with pytest.raises(ConversionError, match="exists"):
        quantize(tiny_bi_dir, [calib], dst, settings=FAST, log=lambda m: None)
    assert main(["quantize", str(tiny_bi_dir), "--calib", str(calib), "--out", str(dst)]) == 2
    assert "exists" in capsys.readouterr().err
    assert sha256_file(dst / "model.json") == before
    with pytest.raises(ConversionError, match="precision"):  # an int8 model is not quantised again
        quantize(dst, [calib], dst.parent / "again", settings=FAST, log=lambda m: None)


def test_cli_quantize(tmp_path, tiny_bi_dir, calib, capsys):
    """The default method is every-linear: all four kinds int8, fixed weight scales, SmoothQuant on
    the FFN inputs, outlier channels; model.json records exactly those settings."""
    out = tmp_path / "cli-int8"
    assert main(["quantize", str(tiny_bi_dir), "--calib", str(calib), "--out", str(out), "--max-loss-rate",
                 str(BI_LIMIT), "--calib-sequences", "16", "--threads", "1"]) == 0
    assert "PASSED" in capsys.readouterr().out
    q = load_model_info(out).quantization
    assert q.gate_passed is True and q.record["gate"]["max_loss_rate"] == BI_LIMIT
    assert q.record["calibration"]["sequences"] <= 16
    method = q.record["method"]
    assert method["int8_linears"] == list(LINEAR_KINDS) and method["weight_scales"] == "fixed"
    assert method["smooth"] == {"ffn_in": 0.5, "ffn_out": 0.9}
    assert method["outlier_channels"] == {"qkv": 8, "ffn_in": 8, "ffn_out": 4}


def test_cli_method_flags_override_the_method(tmp_path, tiny_bi_dir, calib, capsys):
    """--int8-linears keeps the method's per-kind values for the kinds it keeps; --smooth none and
    --outlier-channels replace them; a value for a kind that is not int8 is refused by name."""
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["quantize", "m", "--calib", "c", "--out", "o"])
    assert args.method == "every-linear" and args.int8_linears is None and args.algo is None
    out = tmp_path / "ffn-only"
    assert main(["quantize", str(tiny_bi_dir), "--calib", str(calib), "--out", str(out), "--max-loss-rate", "1e9",
                 "--int8-linears", "ffn_in,ffn_out", "--smooth", "none", "--outlier-channels", "ffn_out=2",
                 "--fp32-linears", "layer0.ffn_in", "--calib-sequences", "16", "--threads", "1"]) == 0
    method = load_model_info(out).quantization.record["method"]
    assert method["int8_linears"] == ["ffn_in", "ffn_out"] and method["smooth"] == {}
    assert method["outlier_channels"] == {"ffn_out": 2} and method["fp32_linears"] == ["layer0.ffn_in"]
    capsys.readouterr()
    assert main(["quantize", str(tiny_bi_dir), "--calib", str(calib), "--out", str(tmp_path / "x"),
                 "--int8-linears", "qkv", "--smooth", "ffn_in=0.5"]) == 2
    assert "smooth" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["quantize", str(tiny_bi_dir), "--calib", str(calib), "--out", str(tmp_path / "x"),
                 "--smooth", "ffn_in=high"]) == 2
    assert "--smooth" in capsys.readouterr().err and not (tmp_path / "x").exists()


def _int8_fc(model_dir: Path, tmp_path: Path) -> tuple[int, int]:
    """(int8 fc, all fc) in the program the predictor really runs (oneDNN marks the int8 ones)."""
    from paddle.base.proto import framework_pb2

    info = load_model_info(model_dir)
    p = PaddlePredictor(info, PredictorSettings(threads=1, save_optimized_program_to=str(tmp_path)))
    p.run(np.array([[101, 2054, 2003, 102]]), np.zeros((1, 4), np.int64), np.ones((1, 4), np.float32))
    desc = framework_pb2.ProgramDesc.FromString((tmp_path / "_optimized.pdmodel").read_bytes())
    fcs = [op for op in desc.blocks[0].ops if op.type == "fc"]
    int8 = [op for op in fcs if any(a.name == "mkldnn_data_type" and a.s == "int8" for a in op.attrs)]
    return len(int8), len(fcs)


def test_linear_kinds_follow_the_layer_structure(tiny_cross_dir):
    from paddle.base.proto import framework_pb2

    from pipeline.convert.quantize import linear_layers

    info = load_model_info(tiny_cross_dir)
    kinds = [k for k, _, _ in linear_layers(framework_pb2.ProgramDesc.FromString(info.program_file.read_bytes()))]
    per_layer = ["qkv", "attn_out", "ffn_in", "ffn_out"]
    assert kinds == per_layer * info.num_hidden_layers + ["head", "head"]  # + pooler and classifier


def test_only_the_chosen_linears_run_int8(int8_bi, tiny_bi_dir, calib, tmp_path):
    """The default quantises the attention block's Linears only: the predictor must run exactly
    those fc in int8 (2 per layer) and the FFN ones in fp32; asking for every kind gives 4 per
    layer. (PaddleSlim's skip list alone leaves every fc int8: this fails without
    `keep_int8_inputs`.)"""
    layers = load_model_info(tiny_bi_dir).num_hidden_layers
    assert load_model_info(int8_bi[0]).quantization.record["method"]["int8_linears"] == ["qkv", "attn_out"]
    assert load_model_info(int8_bi[0]).quantization.int8_linears == ("qkv", "attn_out")
    assert _int8_fc(int8_bi[0], tmp_path / "default") == (2 * layers, 4 * layers)
    every = QuantSettings(int8_linears=("qkv", "attn_out", "ffn_in", "ffn_out"), calib_sequences=32)
    dst, _ = quantize(tiny_bi_dir, [calib], tmp_path / "all", settings=every, max_loss_rate=1e9, threads=1,
                      log=lambda m: None)
    assert _int8_fc(dst, tmp_path / "all-opt") == (4 * layers, 4 * layers)
    ffn_out = QuantSettings(int8_linears=("ffn_out",), calib_sequences=32)
    dst, _ = quantize(tiny_bi_dir, [calib], tmp_path / "ffn", settings=ffn_out, max_loss_rate=1e9, threads=1,
                      log=lambda m: None)
    assert _int8_fc(dst, tmp_path / "ffn-opt") == (layers, 4 * layers)


def test_cli_refuses_unknown_linear_kinds(tmp_path, tiny_bi_dir, calib, capsys):
    assert main(["quantize", str(tiny_bi_dir), "--calib", str(calib), "--out", str(tmp_path / "x"),
                 "--int8-linears", "qkv,attention"]) == 2
    assert "--int8-linears" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_keep_int8_inputs_counts_the_linears_that_keep_a_quantize_pair(int8_bi, tiny_bi_dir, tmp_path):
    """Its return is the number of Linears whose input still goes through quantize/dequantize,
    which must equal the quantize ops left; a Linear of a chosen kind whose pair is already gone
    is not counted."""
    from scripts.show_program_ops import op_counts

    layers = load_model_info(tiny_bi_dir).num_hidden_layers
    program = tmp_path / "inference.pdmodel"
    shutil.copyfile(load_model_info(int8_bi[0]).program_file, program)
    assert keep_int8_inputs(program, ("qkv", "attn_out")) == 2 * layers  # what quantize kept: unchanged
    assert op_counts(program)["quantize_linear"] == 2 * layers
    assert keep_int8_inputs(program, ("attn_out",)) == layers  # drops the QKV pairs
    assert op_counts(program)["quantize_linear"] == op_counts(program)["dequantize_linear"] == layers
    assert keep_int8_inputs(program, ("qkv", "ffn_in")) == 0  # their pairs are gone: nothing keeps one
    assert op_counts(program)["quantize_linear"] == op_counts(program)["dequantize_linear"] == 0
    fp32 = tmp_path / "fp32.pdmodel"
    shutil.copyfile(load_model_info(tiny_bi_dir).program_file, fp32)
    assert keep_int8_inputs(fp32, LINEAR_KINDS) == 0  # an fp32 program has no pairs at all


# ----------------------------------------------------------------------------- every Linear int8 (docs/int8-methods.md)

from pipeline.convert import smoothquant as sq  # noqa: E402
from pipeline.convert.quantize import (  # noqa: E402
    EVERY_LINEAR, _split_rows, calibration_batches, linear_layers, linear_names, parse_kind_values)

# EVERY_LINEAR scaled to the tiny models (hidden 32): two outlier channels per split Linear, and
# ffn_out not smoothed (on random weights smoothing leaves a few rows dominating every column,
# so that no row order keeps all columns unclipped; on the default model it pays, see the doc)
TINY_EVERY = QuantSettings(int8_linears=LINEAR_KINDS, weight_scales="fixed", smooth=(("ffn_in", 0.5),),
                           outlier_channels=(("qkv", 2), ("ffn_in", 2), ("ffn_out", 2)), calib_sequences=32)


def _desc(program_file: Path):
    from paddle.base.proto import framework_pb2

    return framework_pb2.ProgramDesc.FromString(Path(program_file).read_bytes())


def _calib_batches(model_dir: Path, calib: Path, n: int = 32):
    from pipeline.convert.gate import encode_rows
    from pipeline.engine.text import TextEncoder, TextEncoderSpec

    info = load_model_info(model_dir)
    cal, _ = _split_rows(read_rows([calib], ColumnMap()))
    text = TextEncoder(TextEncoderSpec.of(info))
    return calibration_batches(encode_rows(text, info, cal, info.max_seq_len), text.pad_id, QuantSettings(calib_sequences=n))


def _optimized_fc(model_dir: Path, tmp_path: Path) -> list:
    """The fc ops of the program the predictor really runs."""
    p = PaddlePredictor(load_model_info(model_dir), PredictorSettings(threads=1, save_optimized_program_to=str(tmp_path)))
    p.run(np.array([[101, 2054, 2003, 102]]), np.zeros((1, 4), np.int64), np.ones((1, 4), np.float32))
    return [op for op in _desc(tmp_path / "_optimized.pdmodel").blocks[0].ops if op.type == "fc"]


def _attr(op, name):
    a = next((a for a in op.attrs if a.name == name), None)
    return None if a is None else (list(a.floats) or a.s or a.f)


def _fc_weight(op) -> str:
    return next(v.arguments[0] for v in op.inputs if v.parameter == "W")


def test_smoothing_scales_match_a_numpy_reference():
    rng = np.random.default_rng(3)
    x = np.abs(rng.standard_normal(16)) * 5
    x[3] = 0.0  # a channel that never fires keeps s = 1
    w = rng.standard_normal((16, 24))
    w[7] = 0.0  # an all-zero weight row too
    for alpha in (0.0, 0.5, 0.85, 1.0):
        ref = np.ones(16)
        for j in range(16):
            wmax = max(abs(v) for v in w[j])
            if x[j] > 0 and wmax > 0:
                ref[j] = max(np.exp(alpha * np.log(x[j]) - (1 - alpha) * np.log(wmax)), sq.MIN_SCALE)
        np.testing.assert_allclose(sq.smoothing_scales(x, w, alpha), ref, rtol=1e-6)
    # the point of it: at alpha = 0.5 the smoothed activation and weight row ranges are equal
    s = sq.smoothing_scales(x, w, 0.5)
    live = (x > 0) & (np.abs(w).max(1) > 0)
    np.testing.assert_allclose((x / s)[live], (np.abs(w).max(1) * s)[live], rtol=1e-5)


def test_rewrite_keeps_the_fp32_outputs(tiny_bi_dir, calib, tmp_path):
    """Smoothing (1/s muls, attn_out folded into V), outlier side paths and the FFN channel
    order: the rewritten tiny model computes what the source does, yet its weights changed."""
    batches = _calib_batches(tiny_bi_dir, calib)
    layers = load_model_info(tiny_bi_dir).num_hidden_layers
    res = sq.smooth_model(tiny_bi_dir, tmp_path / "s", batches, {"qkv": 0.5, "attn_out": 0.7, "ffn_in": 0.5, "ffn_out": 0.9},
                          {"qkv": 2, "ffn_in": 2, "ffn_out": 2})
    assert res.max_abs_output_diff <= sq.EQUIVALENCE_TOL and len(res.targets) == 4 * layers
    from scripts.show_program_ops import op_counts

    ops, src_ops = op_counts(tmp_path / "s" / "inference.pdmodel"), op_counts(load_model_info(tiny_bi_dir).program_file)
    assert ops["index_select"] == 3 * layers and ops["elementwise_mul"] == src_ops["elementwise_mul"] + 3 * layers
    assert [k for k, _, _ in linear_layers(_desc(tmp_path / "s" / "inference.pdmodel"))] == \
        [k for k, _, _ in linear_layers(_desc(load_model_info(tiny_bi_dir).program_file))]  # side paths are no Linears
    before = sq.read_params(tiny_bi_dir, "inference.pdmodel", "inference.pdiparams")
    after = sq.read_params(tmp_path / "s", "inference.pdmodel", "inference.pdiparams")
    w = linear_layers(_desc(tmp_path / "s" / "inference.pdmodel"))[0][2]
    assert np.abs(before[w] - after[w]).max() > 1e-3  # not a no-op
    desc = _desc(tmp_path / "s" / "inference.pdmodel")
    blocks = sq.ffn_blocks(desc)
    assert len(blocks) == layers and all(b.inv_scale and b.side_in and b.side_out_index for b in blocks)
    regrouped = sq.regroup_ffn_channels(after, blocks)
    sq.write_model(tmp_path / "r", (tmp_path / "s" / "inference.pdmodel").read_bytes(), regrouped,
                   "inference.pdmodel", "inference.pdiparams")
    assert sq.check_equivalent(tiny_bi_dir, tmp_path / "r", batches[:2]) <= sq.EQUIVALENCE_TOL
    assert not np.array_equal(regrouped[blocks[0].w_out], after[blocks[0].w_out])


def test_folding_smoothing_into_the_layer_norm_is_not_exact(tiny_bi_dir, calib, tmp_path):
    """Why 1/s is a mul in front of the Linear: these encoders are post-LN, so the layer norm's
    output is also the residual input, and dividing its gamma and beta by s changes the model."""
    batches = _calib_batches(tiny_bi_dir, calib)
    desc = _desc(load_model_info(tiny_bi_dir).program_file)
    params = sq.read_params(tiny_bi_dir, "inference.pdmodel", "inference.pdiparams")
    ln = next(op for op in desc.blocks[0].ops if op.type == "layer_norm")
    out = next(v.arguments[0] for v in ln.outputs if v.parameter == "Y")
    gamma, beta = (next(v.arguments[0] for v in ln.inputs if v.parameter == p) for p in ("Scale", "Bias"))
    kind, x, w = linear_layers(desc)[0]
    assert kind == "qkv" and x == out  # the embeddings' layer norm feeds the first QKV Linear
    s = np.linspace(0.5, 2.0, len(params[gamma])).astype(np.float32)
    params[gamma], params[beta], params[w] = params[gamma] / s, params[beta] / s, params[w] * s[:, None]
    sq.write_model(tmp_path / "ln", desc.SerializeToString(), params, "inference.pdmodel", "inference.pdiparams")
    assert sq.check_equivalent(tiny_bi_dir, tmp_path / "ln", batches[:1]) > 1e-3


def test_group_rows_makes_the_chunk_scales_the_column_maxima():
    """Paddle 2.6.2 scales fc output channel i by the max of flat weight values [iK, (i+1)K)
    (for an FFN-out weight [m*N, N]: rows m*i .. m*i+m-1), which clips columns whose max lies
    elsewhere; the regrouped row order puts each column's max row into its own chunk."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    w[rng.integers(0, 64, 6), rng.integers(0, 16, 6)] *= 8  # outliers
    col = np.abs(w).max(0)
    assert (sq.chunk_scale_rows(w) < col).any()  # as Paddle does it: some columns clipped
    np.testing.assert_array_equal(sq.chunk_scale_rows(w), np.abs(w.reshape(16, 64)).max(1))
    order = sq.group_rows_for_chunks(w)
    assert sorted(order) == list(range(64))
    chunk = sq.chunk_scale_rows(w[order])
    assert (chunk >= col).all()  # no column clipped any more
    assert np.mean(np.isclose(chunk, col)) > 0.5  # and most exactly at their own max


def test_paddle_derives_fc_weight_scales_from_the_wrong_axis(int8_bi, tmp_path):
    """The defect `weight_scales='fixed'` works around, as Paddle 2.6.2 has it: the int8 fc's
    Scale_weights are 127 / max of consecutive runs of K weights, not of the columns. If this
    fails after a Paddle upgrade, the workaround may be obsolete (docs/int8-methods.md)."""
    params = sq.read_params(int8_bi[0], "inference.pdmodel", "inference.pdiparams")
    fcs = [op for op in _optimized_fc(int8_bi[0], tmp_path) if _attr(op, "mkldnn_data_type") == "int8"]
    assert fcs
    for op in fcs:
        w = params[_fc_weight(op)]
        k, n = w.shape
        scales = np.array(_attr(op, "Scale_weights"))
        np.testing.assert_allclose(scales, 127 / np.abs(w.reshape(n, k)).max(1), rtol=1e-5)
    assert not np.allclose(scales, 127 / np.abs(w).max(0), rtol=1e-3)


def test_every_linear_method_program(tiny_bi_dir, calib, tmp_path):
    """EVERY_LINEAR on the tiny model: every Linear runs int8; qkv, attn_out and ffn_in with one
    recorded weight scale, ffn_out with Paddle's own per-channel scales, which the FFN channel
    order makes at least (mostly exactly) the column maxima: no weight clipped (in the
    source's order 15 of 32 columns are); outlier channels through fp32 side paths; the record
    says what was done."""
    dst, gate = quantize(tiny_bi_dir, [calib], tmp_path / "every", settings=TINY_EVERY, max_loss_rate=1e9,
                         threads=1, log=lambda m: None)
    info = load_model_info(dst)
    layers = info.num_hidden_layers
    params = sq.read_params(dst, "inference.pdmodel", "inference.pdiparams")
    kinds = {w: k for k, _, w in linear_layers(_desc(info.program_file))}
    fcs = _optimized_fc(dst, tmp_path / "opt")
    int8 = [op for op in fcs if _attr(op, "mkldnn_data_type") == "int8"]
    assert len(int8) == 4 * layers and {kinds[_fc_weight(op)] for op in int8} == set(LINEAR_KINDS)
    for op in int8:
        w, scales = params[_fc_weight(op)], np.array(_attr(op, "Scale_weights"))
        if kinds[_fc_weight(op)] == "ffn_out":
            np.testing.assert_allclose(scales, 127 / sq.chunk_scale_rows(w), rtol=1e-5)  # Paddle's rule
            col = np.abs(w).max(0)
            assert (sq.chunk_scale_rows(w) >= col * (1 - 1e-6)).all()
            assert np.mean(np.isclose(sq.chunk_scale_rows(w), col)) > 0.5
        else:
            np.testing.assert_allclose(scales, [127 / np.abs(w).max()], rtol=1e-5)
    from scripts.show_program_ops import op_counts

    ops = op_counts(info.program_file)
    assert ops["index_select"] == 3 * layers  # qkv, ffn_in and ffn_out split off outlier channels
    assert ops["quantize_linear"] == 4 * layers + 3 * layers  # activations of every Linear + 3 kinds' weights
    m = info.quantization.record["method"]
    assert m["weight_scales"] == "fixed" and m["smooth"] == {"ffn_in": 0.5}
    assert m["outlier_channels"] == {"qkv": 2, "ffn_in": 2, "ffn_out": 2} and m["int8_linears"] == list(LINEAR_KINDS)
    r = m["rewrite"]
    assert r["smoothquant"]["max_abs_fp32_output_diff"] <= sq.EQUIVALENCE_TOL
    assert r["ffn_channels_regrouped"]["blocks"] == layers and r["per_tensor_weight_scales"] == 3 * layers
    assert info.quantization.int8_linears == LINEAR_KINDS and gate.max_abs_score_diff > 0
    out = PaddlePredictor(info).run(np.array([[101, 2054, 102]]), np.zeros((1, 3), np.int64), np.ones((1, 3), np.float32))
    ref = PaddlePredictor(load_model_info(tiny_bi_dir)).run(np.array([[101, 2054, 102]]), np.zeros((1, 3), np.int64),
                                                            np.ones((1, 3), np.float32))
    assert np.abs(out - ref).max() < 0.1  # int8, but the same model


def test_every_linear_method_failing_gate_is_refused(tiny_cross_dir, calib, tmp_path):
    out = tmp_path / "cross-every"
    dst, gate = quantize(tiny_cross_dir, [calib], out, settings=TINY_EVERY, max_loss_rate=0.0, threads=1,
                         log=lambda m: None)
    assert gate.max_abs_score_diff > 0 and dst is None and not gate.passed and not out.exists()
    assert not list(tmp_path.iterdir()), "no staging or rewrite directory left behind"


def test_fp32_linears_stay_fp32(tiny_bi_dir, calib, tmp_path):
    layers = load_model_info(tiny_bi_dir).num_hidden_layers
    names = linear_names(_desc(load_model_info(tiny_bi_dir).program_file))
    assert names[:4] == ["layer0.qkv", "layer0.attn_out", "layer0.ffn_in", "layer0.ffn_out"]
    qs = QuantSettings(int8_linears=LINEAR_KINDS, fp32_linears=("layer0.ffn_out", "layer1.qkv"), calib_sequences=32)
    dst, _ = quantize(tiny_bi_dir, [calib], tmp_path / "x", settings=qs, max_loss_rate=1e9, threads=1, log=lambda m: None)
    assert _int8_fc(dst, tmp_path / "opt") == (4 * layers - 2, 4 * layers)
    with pytest.raises(ConversionError, match="name no Linear"):
        quantize(tiny_bi_dir, [calib], tmp_path / "y", settings=QuantSettings(fp32_linears=("layer9.qkv",)),
                 max_loss_rate=1e9, threads=1, log=lambda m: None)


def test_settings_are_checked():
    with pytest.raises(AssertionError, match="smooth"):
        QuantSettings(smooth=(("ffn_out", 0.5),))  # not an int8 kind of the default
    with pytest.raises(AssertionError, match="attn_out"):
        QuantSettings(outlier_channels=(("attn_out", 4),))
    with pytest.raises(AssertionError, match="alphas"):
        QuantSettings(int8_linears=LINEAR_KINDS, smooth=(("ffn_in", 1.5),))
    assert parse_kind_values("ffn_in=0.5, ffn_out=0.9", float, "--smooth") == (("ffn_in", 0.5), ("ffn_out", 0.9))
    assert parse_kind_values("none", int, "--outlier-channels") == ()
    with pytest.raises(ConversionError, match="KIND=VALUE"):
        parse_kind_values("ffn=0.5", float, "--smooth")
    assert EVERY_LINEAR.int8_linears == LINEAR_KINDS and EVERY_LINEAR.regroups and EVERY_LINEAR.rewrites
    assert not QuantSettings().rewrites
    from pipeline.convert.quantize import settings_for

    assert settings_for() == QuantSettings() and settings_for("every-linear") == EVERY_LINEAR
    assert settings_for("every-linear", smooth=(), calib_sequences=None).smooth == ()  # None: keep the method's
    with pytest.raises(ConversionError, match="--method"):
        settings_for("all")
    with pytest.raises(ConversionError, match="outlier"):  # the default has no ffn_in int8
        settings_for("attention", outlier_channels=(("ffn_in", 4),))
