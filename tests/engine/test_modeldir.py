"""The model directory contract: typed fields read in one place, format 1 read as format 2, and
vocabularies without special tokens refused with a message rather than a traceback."""

import json
import shutil

import pytest

from pipeline.engine.modeldir import ENCODER_INPUTS, POSITION_IDS, ModelDirError, load_model_info


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_meta(folder, change):
    path = folder / "model.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_typed_fields_of_a_converted_model(tiny_cross_dir):
    info = load_model_info(tiny_cross_dir)
    assert (info.task, info.output, info.pooling, info.precision) == ("cross", "score", "cls", "fp32")
    assert info.inputs == ENCODER_INPUTS and not info.takes_position_ids
    assert info.attention == "fused_qkv" and info.pruning is None and info.quantization is None
    assert len(info.checksum) == 64 and info.program_revision >= 2


@pytest.mark.parametrize("gpu_layout", [False, True])
def test_format_1_directories_are_read_as_format_2(tiny_cross_dir, tmp_path, gpu_layout):
    """Before `task` and `inputs` were written, the task was `mode` and the inputs followed from
    the architecture; such directories still load, with the same typed fields."""
    d = _copy(tiny_cross_dir, tmp_path / "v1")

    def to_v1(meta):
        meta["format_version"] = 1
        meta["mode"] = meta.pop("task")
        del meta["inputs"]
        meta["architecture"]["position_ids_input"] = gpu_layout

    _edit_meta(d, to_v1)
    info = load_model_info(d)
    assert info.task == "cross"
    assert info.inputs == ENCODER_INPUTS + ((POSITION_IDS,) if gpu_layout else ())


def test_unknown_format_and_corrupt_json_are_refused(tiny_cross_dir, tmp_path):
    d = _copy(tiny_cross_dir, tmp_path / "m")
    _edit_meta(d, lambda m: m.update(format_version=99))
    with pytest.raises(ModelDirError, match="format_version 99"):
        load_model_info(d)
    (d / "model.json").write_text("{")
    with pytest.raises(ModelDirError, match="corrupt"):
        load_model_info(d)


def test_a_vocab_without_special_tokens_is_refused_with_its_name(tiny_cross_dir, tmp_path, capsys):
    from pipeline.cli import main

    d = _copy(tiny_cross_dir, tmp_path / "m")
    lines = (d / "vocab.txt").read_text(encoding="utf-8").split("\n")
    (d / "vocab.txt").write_text("\n".join("[SEP]x" if t == "[SEP]" else t for t in lines), encoding="utf-8")
    with pytest.raises(ModelDirError, match=r"lacks the special tokens \['\[SEP\]'\]"):
        load_model_info(d)
    data = tmp_path / "in.tsv"
    data.write_text("qid\tquery\tdoc_id\tdoc\nq\ta\td\tb\n")
    assert main(["run", str(data), "--model", str(d), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "vocab.txt lacks the special tokens" in err and "Traceback" not in err
