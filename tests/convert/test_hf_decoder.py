"""Hugging Face decoder directories (convert/hf_decoder.py) and the layout dispatch
(convert/decoder_checkpoint.py) against transformers' own outputs.

tests/fixtures/decoders/ holds tiny random `Ernie4_5ForCausalLM` and `LlamaForCausalLM`
checkpoints as `save_pretrained` wrote them, with the float32 logits and 64 greedy tokens that
transformers 4.57.6 on torch computed for a left-padded batch (scripts/make_decoder_fixtures.py,
run in the reference venv). Neither torch nor transformers is needed here.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file, save_file

from pipeline.convert.decoder import DecoderConfig, DecoderForCausalLM, greedy_generate, position_ids_from_mask
from pipeline.convert.decoder_checkpoint import DecoderCheckpoint, read_decoder_checkpoint
from pipeline.convert.errors import ConversionError
from pipeline.convert.gguf_checkpoint import GgufCheckpoint
from pipeline.convert.hf_decoder import read_hf_decoder
from tests.convert.test_decoder import tiny_gguf  # noqa: F401  (a pytest fixture)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "decoders"
NAMES = ["ernie4_5_tied", "ernie4_5_bias_untied", "llama_gqa"]
LOGIT_TOL = 1e-4


def model_of(ck: DecoderCheckpoint, cfg: DecoderConfig = None) -> DecoderForCausalLM:
    m = DecoderForCausalLM(cfg or ck.config)
    m.load_weights(ck.weights)
    m.eval()
    return m


def prompt_logits(model, ref) -> np.ndarray:
    ids, mask = paddle.to_tensor(ref["input_ids"]), paddle.to_tensor(ref["attention_mask"])
    with paddle.no_grad():
        logits, _ = model(ids, position_ids_from_mask(mask), mask)
    return logits.numpy()


def max_real_diff(logits, ref) -> float:
    real = ref["attention_mask"].astype(bool)
    return float(np.abs(logits - ref["logits"])[real].max())


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    d = FIXTURES / request.param
    return request.param, read_decoder_checkpoint(d), dict(np.load(d / "reference.npz"))


# ----------------------------------------------------------------------------- against transformers


def test_logits_match_transformers_at_every_real_position(fixture):
    name, ck, ref = fixture
    diff = max_real_diff(prompt_logits(model_of(ck), ref), ref)
    assert diff < LOGIT_TOL, f"{name}: max |logit difference| {diff:.2e}"


def test_64_greedy_tokens_match_transformers_generate(fixture):
    name, ck, ref = fixture
    got = greedy_generate(model_of(ck), ref["input_ids"], ref["attention_mask"], 64).numpy()
    assert got.shape == ref["greedy"].shape == (3, 64)
    mismatch = np.argwhere(got != ref["greedy"])
    assert mismatch.size == 0, f"{name}: first differences at (row, step) {mismatch[:3].tolist()}"


def test_the_rope_convention_is_what_makes_ernie_match():
    """Negative control: ERNIE 4.5 with Llama's rotate_half RoPE is far off (so the test can fail)."""
    d = FIXTURES / "ernie4_5_tied"
    ck, ref = read_decoder_checkpoint(d), np.load(d / "reference.npz")
    assert ck.config.rope_interleaved
    wrong = DecoderConfig(**{**ck.config.to_dict(), "rope_interleaved": False})
    assert max_real_diff(prompt_logits(model_of(ck, wrong), ref), ref) > 1e-2


# ----------------------------------------------------------------------------- what is read


def test_ernie_config_fields():
    tied = read_hf_decoder(FIXTURES / "ernie4_5_tied")
    c = tied.config
    assert (c.model_type, c.rope_interleaved, c.tie_word_embeddings, c.head_dim, c.dim_per_head) == (
        "ernie4_5", True, True, 16, 16)
    assert (c.attention_bias, c.out_bias, c.mlp_bias) == (False, False, False)
    assert (c.rope_theta, c.rms_norm_eps, c.num_key_value_heads) == (500000.0, 1e-5, 2)
    assert "lm_head.weight" not in tied.weights and tied.quant_types == {"BF16": 20}
    assert tied.architecture == "ernie4_5"

    bias = read_hf_decoder(FIXTURES / "ernie4_5_bias_untied").config
    assert (bias.attention_bias, bias.out_bias, bias.mlp_bias, bias.tie_word_embeddings) == (True, True, True, False)
    assert bias.head_dim is None and bias.dim_per_head == 8


def test_llama_fields_tokens_template_and_sources():
    d = FIXTURES / "llama_gqa"
    ck = read_decoder_checkpoint(d)
    assert isinstance(ck, DecoderCheckpoint) and ck.architecture == "llama"
    assert not ck.config.rope_interleaved and not ck.config.tie_word_embeddings
    assert ck.special_tokens == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "unk_token_id": 3}
    assert ck.eos_token_ids == (2, 5)  # generation_config.json's list
    assert ck.tokenizer.encode("w5 w6 w127", add_special_tokens=False).ids == [5, 6, 127]
    assert ck.chat_template.startswith("{% for m in messages %}")
    assert (ck.add_bos_token, ck.add_eos_token) == (False, False)
    assert {p.name for p in ck.source_files} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert all(p.is_file() for p in ck.source_files)
    for name, w in ck.weights.items():
        assert w.dtype == np.float32 and w.flags.c_contiguous, name
    assert ck.weights["layers.0.self_attn.k_proj.weight"].shape == (32, 16)  # [in, out]
    assert ck.weights["lm_head.weight"].shape == (32, 128)


def test_without_weights_reads_and_checks_the_rest():
    ck = read_decoder_checkpoint(FIXTURES / "ernie4_5_bias_untied", with_weights=False)
    assert ck.weights == {} and ck.config.num_hidden_layers == 2 and ck.quant_types == {"F16": 35}


def test_gguf_checkpoint_is_a_decoder_checkpoint(tiny_gguf):  # noqa: F811
    path = tiny_gguf[0]
    assert GgufCheckpoint is DecoderCheckpoint
    ck = read_decoder_checkpoint(path, with_weights=False)
    assert ck.architecture == "llama" and ck.source_files == [path]
    assert ck.eos_token_ids == (ck.special_tokens["eos_token_id"],)


# ----------------------------------------------------------------------------- layouts


def copy_fixture(tmp_path, name="llama_gqa") -> Path:
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_sharded_checkpoint_reads_like_one_file(tmp_path):
    d = copy_fixture(tmp_path)
    tensors = load_file(d / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, d / file)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}))
    one, two = read_decoder_checkpoint(FIXTURES / "llama_gqa"), read_decoder_checkpoint(d)
    assert one.weights.keys() == two.weights.keys()
    for n in one.weights:
        assert np.array_equal(one.weights[n], two.weights[n]), n
    assert {p.name for p in two.source_files} >= set(shards) | {"model.safetensors.index.json"}


def test_layout_detection_refuses_what_is_neither(tmp_path):
    with pytest.raises(ConversionError, match="no such file or directory; expected a .gguf file"):
        read_decoder_checkpoint(tmp_path / "nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="model.safetensors"):
        read_decoder_checkpoint(empty)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(ConversionError, match="not a decoder checkpoint; expected"):
        read_decoder_checkpoint(other)
    d = copy_fixture(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "gone.safetensors"}}))
    with pytest.raises(ConversionError, match="shard 'gone.safetensors' is missing"):
        read_decoder_checkpoint(d)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("changes, message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "config.json: rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, "rope_scaling"),
    ({"model_type": "qwen2"}, "model_type 'qwen2' is not supported"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"moe_num_experts": 64}, "moe_num_experts"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"hidden_size": None}, "hidden_size is missing"),
])
def test_config_refusals_name_file_and_key(tmp_path, changes, message):
    d = copy_fixture(tmp_path)
    edit_config(d, **changes)
    with pytest.raises(ConversionError, match=message) as e:
        read_decoder_checkpoint(d)
    assert str(d / "config.json") in str(e.value)


def test_ernie_head_dim_defaults_as_transformers_does(tmp_path):
    """Ernie4_5Config: head_dim left out is 128; an explicit null is hidden_size / heads."""
    d = copy_fixture(tmp_path, "ernie4_5_bias_untied")  # head_dim 8 = 32 / 4
    edit_config(d, head_dim=None)
    assert read_decoder_checkpoint(d, with_weights=False).config.dim_per_head == 8
    cfg = json.loads((d / "config.json").read_text())
    del cfg["head_dim"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"q_proj.weight has shape \(32, 32\), config.json implies \(512, 32\)"):
        read_decoder_checkpoint(d, with_weights=False)


def test_harmless_config_values_are_accepted(tmp_path):
    d = copy_fixture(tmp_path)
    edit_config(d, rope_scaling={"rope_type": "default"}, pretraining_tp=1, attention_dropout=0.0)
    assert read_decoder_checkpoint(d, with_weights=False).config.num_hidden_layers == 2


def test_missing_tensor_is_refused(tmp_path):
    d = copy_fixture(tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ConversionError, match=r"missing tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\]"):
        read_decoder_checkpoint(d)


def test_wrong_shape_and_unexpected_tensor_are_refused(tmp_path):
    d = copy_fixture(tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)  # wants (16, 32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ConversionError, match=r"k_proj.weight has shape \(32, 32\), config.json implies \(16, 32\)"):
        read_decoder_checkpoint(d, with_weights=False)

    d2 = copy_fixture(tmp_path / "b")
    tensors = load_file(d2 / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)  # attention_bias is false
    save_file(tensors, d2 / "model.safetensors")
    with pytest.raises(ConversionError, match="unexpected tensor"):
        read_decoder_checkpoint(d2)


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    d = copy_fixture(tmp_path)
    edit_config(d, vocab_size=64)
    with pytest.raises(ConversionError, match="128 tokens, but config.json has vocab_size 64"):
        read_decoder_checkpoint(d)
