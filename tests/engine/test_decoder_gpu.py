"""GPU generation's plan and refusals (engine/decoder_gpu.py, config): the Config calls, what the
CPU build says is missing, and `generate --device gpu --precision fp16` accepted on a (probed)
GPU build. Nothing here runs on a GPU."""

import zlib  # noqa: F401 - before paddle

from pathlib import Path

import pytest

from pipeline.engine import decoder_gpu as dg

CPU_BUILD = lambda: (False, 0, False)  # noqa: E731 - what this machine's paddlepaddle 2.6.2 offers
GPU_BUILD = lambda: (True, 1, True)  # noqa: E731


def _skip_on_a_gpu_build():
    if dg._cuda_build()[0]:
        pytest.skip("this install is a CUDA build: the CPU-build refusal does not apply")


def test_config_plan():
    calls = dg.gpu_generation_config_calls(dg.GpuGenerationSettings(gpu_id=1, memory_pool_mb=2048))
    assert calls == [dg.ConfigCall("enable_use_gpu", (2048, 1, "PrecisionType.Float32")),
                     dg.ConfigCall("switch_ir_optim", (True,)), dg.ConfigCall("enable_memory_optim"),
                     dg.ConfigCall("switch_use_feed_fetch_ops", (False,)),
                     dg.ConfigCall("switch_specify_input_names", (True,)), dg.ConfigCall("disable_glog_info")]
    # The program is fp16 as exported: no mixed-precision conversion is asked for.
    assert not any("Half" in str(a) for c in calls for a in c.args)


def test_config_plan_applies_to_a_real_config():
    """Every call exists on Paddle 2.6.2's Config; the CPU build accepts them all and stays on
    the CPU (it logs "Please use PaddlePaddle with GPU version" for enable_use_gpu)."""
    from pipeline.engine.paddle_env import import_inference

    pi = import_inference()
    config = pi.Config("prefill.pdmodel", "decoder.pdiparams")
    dg.apply_config_calls(config, dg.gpu_generation_config_calls(dg.GpuGenerationSettings()))
    assert config.ir_optim() and not config.use_feed_fetch_ops_enabled() and config.specify_input_name()
    assert config.glog_info_disabled()
    assert not config.use_gpu()  # the CPU build: what a GPU build would turn on is not verified here


def test_cpu_build_says_what_is_missing():
    _skip_on_a_gpu_build()
    with pytest.raises(dg.GpuGenerationUnavailable) as e:
        dg.require_gpu_build()  # the real probe: this install
    msg = str(e.value)
    assert "CPU-only paddlepaddle 2.6.2" in msg and "requirements-gpu.txt" in msg and "paddlepaddle-gpu 2.6.2" in msg
    assert "fused_multi_transformer" in msg
    assert dg._cuda_build() == (False, 0, False)


@pytest.mark.parametrize("device,precision,fused,msg", [
    ("cpu", "fp16", False, "--precision fp16 needs --device gpu"),
    ("cpu", "auto", True, "is the GPU export"),
    ("gpu", "fp32", True, "runs fp16"),
    ("gpu", "fp16", False, "--target gpu"),
])
def test_refusals(device, precision, fused, msg):
    with pytest.raises(ValueError, match=msg):
        dg.generation_device(device, precision, False, fused, Path("m"), probe=GPU_BUILD)


def test_accepted_on_a_gpu_build_only():
    assert dg.generation_device("gpu", "fp16", False, True, Path("m"), probe=GPU_BUILD) == ("gpu", "fp16")
    assert dg.generation_device("gpu", "auto", False, True, Path("m"), probe=GPU_BUILD) == ("gpu", "fp16")
    # on the CPU the precision is left to config.choose_precision (gates and CPU features)
    assert dg.generation_device("cpu", "auto", False, False, Path("m")) == ("cpu", "auto")
    with pytest.raises(ValueError, match="CPU-only paddlepaddle"):
        dg.generation_device("gpu", "fp16", False, True, Path("m"), probe=CPU_BUILD)
    with pytest.raises(ValueError, match="sees no GPU"):
        dg.generation_device("gpu", "fp16", False, True, Path("m"), probe=lambda: (True, 0, True))


@pytest.fixture(scope="module")
def fused_dir(tiny_decoder_dir, tmp_path_factory):
    from pipeline.convert.decoder_fused import convert_decoder_fused

    return convert_decoder_fused(tiny_decoder_dir.parent / "tiny.gguf", tmp_path_factory.mktemp("f") / "gpu",
                                 max_seq_len=128)


def _cfg(model, **kw):
    from pipeline.config import GenerationOptions, RunConfig

    return RunConfig(inputs=(), model=model, out_dir=Path("unused"), mode="generate", workers=0, threads=1,
                     streams=1, progress=False, max_batch_size=8, generation=GenerationOptions(max_new_tokens=8), **kw)


def test_config_validation(fused_dir, tiny_decoder_dir, monkeypatch):
    from pipeline.config import ConfigError, resolve
    from pipeline.engine.modeldir import load_model_info

    _skip_on_a_gpu_build()
    fused, cpu = load_model_info(fused_dir), load_model_info(tiny_decoder_dir)
    with pytest.raises(ConfigError, match="requirements-gpu.txt.*CPU-only paddlepaddle 2.6.2"):
        resolve(_cfg(fused_dir, device="gpu", precision="fp16"), fused)  # this CPU build
    with pytest.raises(ConfigError, match="--precision fp16 needs --device gpu"):
        resolve(_cfg(tiny_decoder_dir, precision="fp16"), cpu)
    with pytest.raises(ConfigError, match="GPU export"):
        resolve(_cfg(fused_dir), fused)
    assert resolve(_cfg(tiny_decoder_dir), cpu).device == "cpu"
    monkeypatch.setattr(dg, "_cuda_build", GPU_BUILD)  # as a CUDA build with a GPU would answer
    s = resolve(_cfg(fused_dir, device="gpu", precision="fp16"), fused)
    assert (s.device, s.precision) == ("gpu", "fp16")
    from pipeline.engine.generator import kv_spec

    arch = fused.architecture  # the budget counts the cache the op holds: every query head, 2 bytes
    assert kv_spec(fused).bytes_per_token == arch["num_hidden_layers"] * 2 * arch["num_attention_heads"] * fused.head_dim * 2
    assert kv_spec(cpu).bytes_per_token == arch["num_hidden_layers"] * 2 * arch["num_key_value_heads"] * cpu.head_dim * 4


def test_predictor_refuses_on_the_cpu_build(fused_dir):
    _skip_on_a_gpu_build()
    with pytest.raises(dg.GpuGenerationUnavailable, match="CPU-only paddlepaddle"):
        dg.FusedDecoderPredictor(fused_dir, max_batch=2, max_len=16)


def test_cli_generate_on_the_gpu_fails_with_what_is_missing(fused_dir, tmp_path, capsys):
    from pipeline.cli import main

    _skip_on_a_gpu_build()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hello"}\n')
    assert main(["generate", str(prompts), "--model", str(fused_dir), "--out", str(tmp_path / "o"),
                 "--device", "gpu", "--precision", "fp16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "requirements-gpu.txt" in err and "CPU-only paddlepaddle" in err
    assert not (tmp_path / "o" / "generations.jsonl").exists()
    assert main(["generate", str(prompts), "--model", str(fused_dir), "--out", str(tmp_path / "o"),
                 "--precision", "fp16", "--no-progress"]) == 2
    assert "--precision fp16 needs --device gpu" in capsys.readouterr().err
