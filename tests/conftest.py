"""Shared fixtures: the real default model converted once per session, and tiny random models.

zlib is imported before anything can import paddle (paddle 2.6 breaks zlib otherwise), and
PaddleNLP, used only as a reference, is kept offline and out of the home directory.
"""

import zlib  # noqa: F401 - must come first

import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("PPNLP_HOME", str(Path(tempfile.gettempdir()) / "pipeline-tests-ppnlp"))
for var in ("HF_HUB_OFFLINE", "AISTUDIO_HUB_OFFLINE", "AISTUDIO_BOS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipeline.config import default_model_source  # noqa: E402


@pytest.fixture(scope="session")
def minilm_src() -> Path:
    return default_model_source()


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory, minilm_src) -> Path:
    from pipeline.convert import convert

    return convert(minilm_src, tmp_path_factory.mktemp("models") / "minilm", name="all-MiniLM-L6-v2")


def write_hf_checkpoint(folder: Path, vocab_file: Path, *, hidden=32, layers=2, heads=4, ffn=64,
                        num_labels=0, seed=0, max_pos=128) -> Path:
    """A random BERT checkpoint in Hugging Face layout (torch [out, in] Linear weights)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    vocab = sum(1 for _ in open(vocab_file, encoding="utf-8"))
    w = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)  # noqa: E731
    ones = lambda n: (1 + rng.standard_normal(n) * 0.05).astype(np.float32)  # noqa: E731
    t = {
        "bert.embeddings.word_embeddings.weight": w(vocab, hidden),
        "bert.embeddings.position_embeddings.weight": w(max_pos, hidden),
        "bert.embeddings.token_type_embeddings.weight": w(2, hidden),
        "bert.embeddings.LayerNorm.weight": ones(hidden),
        "bert.embeddings.LayerNorm.bias": w(hidden),
        "bert.pooler.dense.weight": w(hidden, hidden),
        "bert.pooler.dense.bias": w(hidden),
    }
    for i in range(layers):
        p = f"bert.encoder.layer.{i}"
        for n in ("query", "key", "value"):
            t[f"{p}.attention.self.{n}.weight"] = w(hidden, hidden)
            t[f"{p}.attention.self.{n}.bias"] = w(hidden)
        t[f"{p}.attention.output.dense.weight"] = w(hidden, hidden)
        t[f"{p}.attention.output.dense.bias"] = w(hidden)
        t[f"{p}.attention.output.LayerNorm.weight"] = ones(hidden)
        t[f"{p}.attention.output.LayerNorm.bias"] = w(hidden)
        t[f"{p}.intermediate.dense.weight"] = w(ffn, hidden)
        t[f"{p}.intermediate.dense.bias"] = w(ffn)
        t[f"{p}.output.dense.weight"] = w(hidden, ffn)
        t[f"{p}.output.dense.bias"] = w(hidden)
        t[f"{p}.output.LayerNorm.weight"] = ones(hidden)
        t[f"{p}.output.LayerNorm.bias"] = w(hidden)
    if num_labels:
        t["classifier.weight"] = w(num_labels, hidden) * 20
        t["classifier.bias"] = w(num_labels)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "intermediate_size": ffn, "hidden_act": "gelu",
        "max_position_embeddings": max_pos, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    }))
    (folder / "vocab.txt").write_bytes(Path(vocab_file).read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return folder


@pytest.fixture(scope="session")
def tiny_cross_dir(tmp_path_factory, minilm_src) -> Path:
    from pipeline.convert import convert

    root = tmp_path_factory.mktemp("tiny")
    src = write_hf_checkpoint(root / "ckpt-cross", minilm_src / "vocab.txt", num_labels=1)
    return convert(src, root / "cross", name="tiny-cross")


@pytest.fixture(scope="session")
def tiny_bi_dir(tmp_path_factory, minilm_src) -> Path:
    from pipeline.convert import convert

    root = tmp_path_factory.mktemp("tiny")
    src = write_hf_checkpoint(root / "ckpt-bi", minilm_src / "vocab.txt", num_labels=0)
    return convert(src, root / "bi", name="tiny-bi")


TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory) -> Path:
    """A tiny random llama decoder (2 layers, GQA, byte-level BPE, a ChatML template), from a
    GGUF file through `convert_decoder`: the generation model of the job tests."""
    import numpy as np

    from pipeline.convert import convert_decoder
    from pipeline.convert.decoder import DecoderConfig
    from pipeline.convert.gguf_checkpoint import expected_shapes, permute_qk
    from tests.convert.test_decoder import TINY, _byte_level_vocab, _gguf_name, random_weights, write_tiny_gguf

    tokens, _ = _byte_level_vocab()
    cfg = DecoderConfig(**{**TINY, "vocab_size": len(tokens), "max_position_embeddings": 512})
    raw = {}
    for name, arr in random_weights(expected_shapes(cfg), seed=5).items():
        t = arr.T if arr.ndim == 2 and name != "embed_tokens.weight" else arr
        if ".q_proj." in name or ".k_proj." in name:
            t = permute_qk(t, cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads)
        raw[_gguf_name(name)] = np.ascontiguousarray(t)
    root = tmp_path_factory.mktemp("tiny-decoder")
    write_tiny_gguf(root / "tiny.gguf", raw, cfg, chat_template=TINY_CHAT_TEMPLATE)
    return convert_decoder(root / "tiny.gguf", root / "model", name="tiny-decoder")
