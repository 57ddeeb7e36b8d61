"""int8 post-training quantisation (issue 7) on tiny random models: the command writes an int8
model with its gate recorded in model.json, the predictor runs it with oneDNN int8 for the
quantised ops, a model failing the gate is refused unless --force (then marked failing), and an
existing output is never overwritten without --force."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("paddleslim")

from pipeline.__main__ import main  # noqa: E402
from pipeline.convert import ConversionError  # noqa: E402
from pipeline.modeldir import load_model_info, sha256_file  # noqa: E402
from pipeline.predictor import PaddlePredictor, PredictorSettings, build_config  # noqa: E402
from pipeline.quantize import QuantSettings, held_out_mask, loss_rate, quantize  # noqa: E402
from tests.test_runner import _sample_rows, _write_tsv  # noqa: E402

FAST = QuantSettings(calib_sequences=32)
NEVER = -1.0  # a loss-rate limit no model meets (rates are >= 0): forces a gate failure


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    rows = _sample_rows(12)
    assert held_out_mask([r["qid"] for r in rows]).any() and not held_out_mask([r["qid"] for r in rows]).all()
    return _write_tsv(tmp_path_factory.mktemp("calib") / "calib.tsv", rows)


@pytest.fixture(scope="module")
def int8_bi(tmp_path_factory, tiny_bi_dir, calib) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("q") / "bi-int8"
    dst, gate = quantize(tiny_bi_dir, [calib], out, settings=FAST, max_loss_rate=1e9, threads=1, log=lambda m: None)
    return dst, gate


def test_quantize_writes_an_int8_model_with_its_gate(int8_bi, tiny_bi_dir, calib):
    dst, gate = int8_bi
    assert dst is not None and gate.passed
    info = load_model_info(dst)
    assert info.precision == "int8" and info.mode == "bi"
    q = info.raw["quantization"]
    assert q["calibration"]["files"][0]["sha256"] == sha256_file(calib)
    assert q["calibration"]["calibration_rows"] + q["calibration"]["held_out_rows"] == q["calibration"]["rows"]
    assert q["source_params_sha256"] == sha256_file(Path(tiny_bi_dir) / "inference.pdiparams")
    g = q["gate"]
    assert g["passed"] is True and g["rows"] == q["calibration"]["held_out_rows"] > 0
    for m in ("ndcg_at_10", "pnr"):
        assert g["loss_rate"][m] == pytest.approx(loss_rate(g["fp32"][m], g["int8"][m]))
    assert g["max_abs_score_diff"] >= 0
    # the program really holds quantize/dequantize ops
    from scripts.show_program_ops import op_counts

    ops = op_counts(info.program_file)
    assert ops["quantize_linear"] > 0 and ops["dequantize_linear"] > 0


def test_int8_model_config_enables_onednn_int8_for_fc_only(int8_bi, tiny_bi_dir):
    info = load_model_info(int8_bi[0])
    cfg = build_config(info, PredictorSettings(threads=1))
    assert cfg.mkldnn_enabled() and cfg.mkldnn_int8_enabled()
    assert info.raw["quantization"]["onednn_int8_ops"] == ["fc"]
    assert not build_config(load_model_info(tiny_bi_dir), PredictorSettings(threads=1)).mkldnn_int8_enabled()
    out = PaddlePredictor(info).run(np.array([[101, 2054, 102]]), np.zeros((1, 3), np.int64), np.ones((1, 3), np.float32))
    assert out.shape == (1, 32) and np.isfinite(out).all()
    with pytest.raises(Exception, match="int8 model"):
        PaddlePredictor(info, PredictorSettings(onednn=False))


def test_failing_gate_is_refused_unless_forced(tmp_path, tiny_cross_dir, calib):
    out = tmp_path / "cross-int8"
    dst, gate = quantize(tiny_cross_dir, [calib], out, settings=FAST, max_loss_rate=NEVER, threads=1,
                         log=lambda m: None)
    assert dst is None and not gate.passed and not out.exists()
    assert not [p for p in tmp_path.iterdir()], "no temporary directory left behind"
    dst, gate = quantize(tiny_cross_dir, [calib], out, settings=FAST, max_loss_rate=NEVER, threads=1,
                         force=True, log=lambda m: None)
    info = load_model_info(dst)
    assert info.precision == "int8" and info.mode == "cross"
    assert info.raw["quantization"]["gate"]["passed"] is False
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
    assert main(["quantize", str(tiny_bi_dir), "--calib", str(calib), "--out", str(out), "--max-loss-rate", "1e9",
                 "--calib-sequences", "16", "--threads", "1"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert load_model_info(out).raw["quantization"]["calibration"]["sequences"] <= 16


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

    from pipeline.quantize import linear_layers

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
    assert load_model_info(int8_bi[0]).raw["quantization"]["method"]["int8_linears"] == ["qkv", "attn_out"]
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
