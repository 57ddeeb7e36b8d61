"""Precisions on the CPUs we get: feature detection (injected), what `--precision auto` picks for
every CPU kind and gate state, clear refusals, the ops that run bf16, and the bf16 gate."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.config import ConfigError, choose_precision
from pipeline.engine.cpu import CpuFeatures
from pipeline.engine.modeldir import load_model_info

ZEN3 = {"model": "AMD EPYC 7B13", "flags": ["avx2"]}
ZEN4 = {"model": "AMD EPYC 9B14", "flags": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]}
XEON_AMX = {"model": "Intel Xeon", "flags": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]}
XEON_VNNI = {"model": "Intel Xeon (Cascade Lake)", "flags": ["avx2", "avx512f", "avx512_vnni"]}
CPUS = {"zen3": CpuFeatures.detect(ZEN3, {}), "zen4": CpuFeatures.detect(ZEN4, {}),
        "amx": CpuFeatures.detect(XEON_AMX, {}), "vnni": CpuFeatures.detect(XEON_VNNI, {}),
        "zen4-as-avx2": CpuFeatures.detect(ZEN4, {"ONEDNN_MAX_CPU_ISA": "AVX2"})}
HAS_BF16 = CpuFeatures.detect().bf16


def test_detect_isa_bf16_and_vnni_per_cpu_kind():
    got = {k: (c.isa, c.bf16, c.vnni) for k, c in CPUS.items()}
    assert got == {"zen3": ("AVX2", False, False), "zen4": ("AVX512_CORE_BF16", True, True),
                   "amx": ("AVX512_CORE_AMX", True, True), "vnni": ("AVX512_CORE_VNNI", False, True),
                   "zen4-as-avx2": ("AVX2", False, False)}
    assert CPUS["zen4-as-avx2"].isa_cap == "AVX2"
    # a cap above what the CPU has changes nothing; an unknown cap is ignored
    assert CpuFeatures.detect(ZEN3, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}).isa == "AVX2"
    assert CpuFeatures.detect(XEON_AMX, {"ONEDNN_MAX_CPU_ISA": "avx512_core_vnni"}).isa == "AVX512_CORE_VNNI"
    assert CpuFeatures.detect(XEON_AMX, {"ONEDNN_MAX_CPU_ISA": "nonsense"}).isa == "AVX512_CORE_AMX"


def _with_gate(info, record):
    return dataclasses.replace(info, gates={} if record is None else {"bf16": record})


PASSED = {"passed": True, "forced": False, "loss_rate": {"ndcg_at_10": 0.001, "pnr": 0.0}, "max_loss_rate": 0.01}
FAILED = {"passed": False, "forced": False, "loss_rate": {"ndcg_at_10": 0.02, "pnr": 0.05}, "max_loss_rate": 0.01}
FORCED = {**FAILED, "forced": True}


@pytest.mark.parametrize("cpu", sorted(CPUS))
@pytest.mark.parametrize("gate", ["none", "passed", "failed", "forced"])
def test_auto_and_explicit_choices_for_every_cpu_and_gate(tiny_bi_dir, cpu, gate):
    info = _with_gate(load_model_info(tiny_bi_dir), {"none": None, "passed": PASSED, "failed": FAILED,
                                                     "forced": FORCED}[gate])
    c = CPUS[cpu]
    precision, why = choose_precision("auto", "cpu", info, c)
    assert precision == ("bf16" if c.bf16 and gate == "passed" else "fp32"), why
    assert why.startswith("auto:")
    assert choose_precision("fp32", "cpu", info, c)[0] == "fp32"
    if not c.bf16:
        with pytest.raises(ConfigError, match="needs bf16 kernels .* silently run fp32"):
            choose_precision("bf16", "cpu", info, c)
    elif gate == "failed":
        with pytest.raises(ConfigError, match="FAILED its bf16 gate .* --force"):
            choose_precision("bf16", "cpu", info, c)
    else:
        precision, why = choose_precision("bf16", "cpu", info, c)
        assert precision == "bf16" and (("NOT gated" in why) == (gate == "none"))
    with pytest.raises(ConfigError, match="int8 needs a quantised copy"):
        choose_precision("int8", "cpu", info, c)


def test_int8_model_runs_int8_only_and_says_when_vnni_is_missing(tiny_bi_dir, tmp_path):
    meta = json.loads((tiny_bi_dir / "model.json").read_text())
    fake = tmp_path / "int8"
    fake.mkdir()
    for f in tiny_bi_dir.iterdir():
        (fake / f.name).write_bytes(f.read_bytes())
    meta["precision"] = "int8"
    meta["quantization"] = {"onednn_int8_ops": ["fc"], "gate": {"passed": True}}
    (fake / "model.json").write_text(json.dumps(meta))
    info = load_model_info(fake)
    assert choose_precision("auto", "cpu", info, CPUS["amx"]) == ("int8", "auto: an int8 model")
    precision, why = choose_precision("int8", "cpu", info, CPUS["zen3"])
    assert precision == "int8" and "no VNNI" in why and "more slowly" in why
    for other in ("fp32", "bf16"):
        with pytest.raises(ConfigError, match="runs int8 only"):
            choose_precision(other, "cpu", info, CPUS["amx"])


def test_gpu_keeps_its_precisions(tiny_bi_dir):
    info = load_model_info(tiny_bi_dir)
    assert choose_precision("auto", "gpu", info, CPUS["zen3"])[0] == "fp32"
    assert choose_precision("fp16", "gpu", info, CPUS["zen3"])[0] == "fp16"


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 kernels (AVX512_BF16 or AMX)")
def test_bf16_program_runs_the_matmuls_and_norms_in_bf16_and_the_pooling_in_fp32(tiny_bi_dir):
    from pipeline.engine.predictor import PredictorSettings, optimized_ops

    info = load_model_info(tiny_bi_dir)
    ops = optimized_ops(info, PredictorSettings(precision="bf16"))
    bf16 = {t for (t, kind), n in ops.items() if kind == "bfloat16"}
    assert {"fc", "fused_matmul", "layer_norm", "softmax"} <= bf16, ops
    fp32_ops = {t for (t, kind), n in ops.items() if kind != "bfloat16"}
    assert {"reduce_sum", "p_norm"} <= fp32_ops  # mean pooling and the L2 normalisation stay fp32
    plain = optimized_ops(info, PredictorSettings(precision="fp32"))
    assert not any(kind == "bfloat16" for (_, kind) in plain)


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bf16 kernels (AVX512_BF16 or AMX)")
def test_bf16_gate_is_recorded_and_used_by_auto(tiny_bi_dir, tmp_path):
    from pipeline.convert.precision_gate import gate_precision
    from tests.sample_data import sample_rows, write_tsv

    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_bi_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    data = write_tsv(tmp_path / "calib.tsv", sample_rows(20))
    checksum = load_model_info(model).checksum
    gate = gate_precision(model, [data], "bf16", max_loss_rate=0.05, threads=1)
    info = load_model_info(model)
    record = info.gates["bf16"]
    assert record["passed"] == gate.passed and record["candidate"] == "bf16" and record["rows"] > 0
    assert record["cpu"]["bf16"] is True and info.checksum == checksum  # the params are untouched
    expected = "bf16" if gate.passed else "fp32"
    assert choose_precision("auto", "cpu", info, CpuFeatures.detect())[0] == expected
    # an impossible limit fails the gate: recorded, refused for bf16, forced only on request
    gate = gate_precision(model, [data], "bf16", max_loss_rate=-1.0, threads=1)
    assert not gate.passed and load_model_info(model).gates["bf16"]["passed"] is False
    with pytest.raises(ConfigError, match="FAILED its bf16 gate"):
        choose_precision("bf16", "cpu", load_model_info(model), CpuFeatures.detect())
    gate_precision(model, [data], "bf16", max_loss_rate=-1.0, threads=1, force=True)
    info = load_model_info(model)
    assert choose_precision("bf16", "cpu", info, CpuFeatures.detect())[0] == "bf16"
    assert choose_precision("auto", "cpu", info, CpuFeatures.detect())[0] == "fp32"


def test_report_records_the_precision_and_the_cpu(tiny_bi_dir, tmp_path):
    from pipeline.config import RunConfig
    from pipeline.job.run import run
    from tests.sample_data import sample_rows, write_tsv

    data = write_tsv(tmp_path / "in.tsv", sample_rows(2))
    info = load_model_info(tiny_bi_dir)
    cfg = RunConfig(inputs=(data,), out_dir=tmp_path / "out", workers=0, threads=1, streams=1, progress=False,
                    cpu=CPUS["zen3"])
    report = run(cfg, info)
    p = report["precision"]
    assert p["used"] == "fp32" and p["reason"].startswith("auto: fp32")
    assert p["cpu"]["isa"] == "AVX2" and p["cpu"]["bf16"] is False
    assert report["settings"]["precision"] == "fp32"
    with pytest.raises(ConfigError, match="needs bf16 kernels"):
        run(dataclasses.replace(cfg, precision="bf16", out_dir=tmp_path / "out2"), info)
