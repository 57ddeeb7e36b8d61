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
                 "--int8-linears", ",".join(LINEAR_KINDS), "--calib-sequences", "32", "--threads", "1"]) == 2
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
    out = tmp_path / "cli-int8"
    assert main(["quantize", str(tiny_bi_dir), "--calib", str(calib), "--out", str(out), "--max-loss-rate",
                 str(BI_LIMIT), "--calib-sequences", "16", "--threads", "1"]) == 0
    assert "PASSED" in capsys.readouterr().out
    q = load_model_info(out).quantization
    assert q.gate_passed is True and q.record["gate"]["max_loss_rate"] == BI_LIMIT
    assert q.record["calibration"]["sequences"] <= 16


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
