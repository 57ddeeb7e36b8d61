import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pipeline.convert import ConversionError, convert
from pipeline.engine.modeldir import ModelDirError, load_model_info
from tests.conftest import write_hf_checkpoint


@pytest.fixture
def ckpt(tmp_path, minilm_src):
    return write_hf_checkpoint(tmp_path / "ckpt", minilm_src / "vocab.txt", hidden=16, layers=1, heads=2, ffn=32)


def test_convert_writes_a_loadable_runtime_dir(ckpt, tmp_path):
    dst = convert(ckpt, tmp_path / "m")
    info = load_model_info(dst)
    meta = json.loads((dst / "model.json").read_text())
    assert info.task == "bi" and info.pooling == "mean" and meta["precision"] == "fp32"
    assert info.inputs == ("input_ids", "token_type_ids", "attention_mask") and meta["inputs"] == list(info.inputs)
    assert meta["source"]["layout"] == "hf" and len(meta["source"]["sha256"]) == 64
    assert (dst / "inference.pdmodel").is_file() and (dst / "vocab.txt").is_file()


def test_convert_refuses_to_overwrite_without_force(ckpt, tmp_path):
    dst = convert(ckpt, tmp_path / "m")
    before = (dst / "model.json").read_text()
    with pytest.raises(ConversionError, match="--force"):
        convert(ckpt, dst)
    assert (dst / "model.json").read_text() == before
    convert(ckpt, dst, force=True)


def test_convert_explains_a_shape_mismatch_and_leaves_nothing(ckpt, tmp_path):
    t = load_file(str(ckpt / "model.safetensors"))
    t["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((33, 16), np.float32)
    save_file(t, str(ckpt / "model.safetensors"))
    with pytest.raises(ConversionError, match="linear1.weight has shape"):
        convert(ckpt, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob(".m.*"))


def test_convert_names_a_missing_tensor(ckpt, tmp_path):
    t = load_file(str(ckpt / "model.safetensors"))
    del t["bert.encoder.layer.0.attention.self.key.bias"]
    save_file(t, str(ckpt / "model.safetensors"))
    with pytest.raises(ConversionError, match="attention.self.key.bias"):
        convert(ckpt, tmp_path / "m")


def test_cross_mode_needs_a_classifier(ckpt, tmp_path):
    with pytest.raises(ConversionError, match="no classifier head"):
        convert(ckpt, tmp_path / "m", mode="cross")


def test_vocab_that_does_not_match_embeddings(ckpt, tmp_path):
    with open(ckpt / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("[extra]\n")
    with pytest.raises(ConversionError, match="embedding table"):
        convert(ckpt, tmp_path / "m")


def test_model_dir_problems_fail_fast(ckpt, tmp_path):
    dst = convert(ckpt, tmp_path / "m")
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model_info(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    (bad / "model.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="corrupt"):
        load_model_info(bad)
    shutil.copytree(dst, tmp_path / "v")
    with open(tmp_path / "v" / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("[x]\n")
    with pytest.raises(ModelDirError, match="do not belong together"):
        load_model_info(tmp_path / "v")
    (dst / "inference.pdiparams").unlink()
    with pytest.raises(ModelDirError, match="missing"):
        load_model_info(dst)


def test_unknown_target_is_refused_before_anything_is_written(ckpt, tmp_path):
    with pytest.raises(ConversionError, match="target must be one of"):
        convert(ckpt, tmp_path / "m", target="tpu")
    assert not (tmp_path / "m").exists()


def test_split_qkv_slices_the_fused_projection():
    from pipeline.convert.checkpoints import split_qkv

    w = np.arange(4 * 12, dtype=np.float32).reshape(4, 12)
    b = np.arange(12, dtype=np.float32)
    out = split_qkv({"encoder.layers.0.qkv_proj.weight": w, "encoder.layers.0.qkv_proj.bias": b, "x": b})
    assert sorted(out) == sorted(["x"] + [f"encoder.layers.0.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")])
    assert np.array_equal(np.concatenate([out[f"encoder.layers.0.{p}_proj.weight"] for p in "qkv"], axis=1), w)
    assert np.array_equal(out["encoder.layers.0.k_proj.bias"], b[4:8])


def test_gpu_target_keeps_the_converter_rules(ckpt, tmp_path):
    dst = convert(ckpt, tmp_path / "m", target="gpu")
    meta = json.loads((dst / "model.json").read_text())
    assert meta["attention"] == "separate_qkv" and meta["architecture"]["fused_qkv"] is False
    with pytest.raises(ConversionError, match="--force"):
        convert(ckpt, dst, target="gpu")
    convert(ckpt, dst, force=True)  # back to the CPU layout in place
    assert json.loads((dst / "model.json").read_text())["attention"] == "fused_qkv"
