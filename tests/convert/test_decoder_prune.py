"""Vocabulary pruning of a decoder (pipeline/convert/decoder_prune.py) on a tiny random llama
whose byte-level BPE has 702 merged tokens on top of the 256 byte symbols (so pruning has rows
to drop): the pruned programs' logits equal the full model's at the kept ids, greedy outputs are
identical where the kept set covers them and come back as full-vocabulary ids, a prompt token
outside the kept set is spelled out and counted, and the gate refuses (or, forced, marks) a
failing model."""

import json
import string
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import GenerationOptions, RunConfig
from pipeline.convert.decoder_prune import PruneGateFailed, held_out, prune_decoder_vocab
from pipeline.engine.modeldir import load_model_info
from pipeline.job.run import run
from tests.conftest import TINY_CHAT_TEMPLATE

LETTERS = string.ascii_lowercase


def _wide_vocab():
    """The tiny tokenizer plus 'Ġx' for every letter and every letter pair 'xy' as merges."""
    from tokenizers import pre_tokenizers

    merges = [f"Ġ {a}" for a in LETTERS] + [f"{a} {b}" for a in LETTERS for b in LETTERS]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += [m.replace(" ", "") for m in merges]
    return tokens, merges


@pytest.fixture(scope="module")
def wide_decoder(tmp_path_factory) -> Path:
    from pipeline.convert import convert_decoder
    from pipeline.convert.decoder import DecoderConfig
    from pipeline.convert.gguf_checkpoint import expected_shapes, permute_qk
    import tests.convert.test_decoder as td

    tokens, _ = _wide_vocab()
    cfg = DecoderConfig(**{**td.TINY, "vocab_size": len(tokens), "max_position_embeddings": 512})
    raw = {}
    for name, arr in td.random_weights(expected_shapes(cfg), seed=11).items():
        t = arr.T if arr.ndim == 2 and name != "embed_tokens.weight" else arr
        if ".q_proj." in name or ".k_proj." in name:
            t = permute_qk(t, cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads)
        raw[td._gguf_name(name)] = np.ascontiguousarray(t)
    root = tmp_path_factory.mktemp("wide-decoder")
    with pytest.MonkeyPatch.context() as mp:  # write_tiny_gguf takes its vocab from there
        mp.setattr(td, "_byte_level_vocab", _wide_vocab)
        td.write_tiny_gguf(root / "wide.gguf", raw, cfg, chat_template=TINY_CHAT_TEMPLATE)
    return convert_decoder(root / "wide.gguf", root / "model", name="wide-decoder")


def words(rnd, n, alphabet=LETTERS[:13]):
    return " ".join("".join(rnd.choice(alphabet) for _ in range(rnd.randint(2, 5))) for _ in range(n))


def write_rows(path: Path, n: int, seed: int = 0, references=None) -> Path:
    import random

    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        text = words(rnd, 2 + i % 5)
        ref = references[f"p{i:03d}"] if references else words(rnd, 3)
        rows.append({"id": f"p{i:03d}", "messages": [{"role": "user", "content": text}], "reference": ref})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def generate(model: Path, data: Path, out: Path, max_new_tokens=8):
    report = run(RunConfig(inputs=(data,), model=model, out_dir=out, mode="generate", workers=0, threads=1,
                           progress=False, chunk_rows=16, window_rows=64,
                           generation=GenerationOptions(max_new_tokens=max_new_tokens)), load_model_info(model))
    gens = {r["id"]: r for r in map(json.loads, (out / "generations.jsonl").read_text().splitlines())}
    return gens, report


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("prune-data") / "rows.jsonl", 24)


@pytest.fixture(scope="module")
def pruned(wide_decoder, data, tmp_path_factory):
    """Pruned with every learning row's outputs learned; forced (a random model's gate may fail)."""
    root = tmp_path_factory.mktemp("pruned")
    res = prune_decoder_vocab(wide_decoder, [data], root / "model", outputs_sample=1000, max_new_tokens=8,
                              force=True, threads=1, cache_root=root / "cache")
    return res


def test_the_pruned_directory_and_its_record(wide_decoder, pruned):
    full, info = load_model_info(wide_decoder), load_model_info(pruned.path)
    kept = info.vocab_map.kept
    assert pruned.source_vocab_size == full.vocab_size == 3 + 256 + 26 + 676
    assert info.vocab_size == len(kept) == pruned.ids_kept < full.vocab_size
    assert {0, 1, 2} <= set(kept.tolist())  # the special tokens
    p = info.meta["pruning"]
    assert p["source_params_sha256"] == full.checksum and p["held_out_rows"] == pruned.held_out_rows
    assert pruned.learn_rows + pruned.held_out_rows == 24 and pruned.held_out_rows > 0
    g = info.gates["pruning"]
    assert g["passed"] == pruned.gate.result.passed and g["forced"] == (not g["passed"])
    assert info.meta["validation"]["max_abs_restricted_logit_diff_vs_full"] < 1e-4
    assert info.params_file.stat().st_size < full.params_file.stat().st_size
    # special tokens stay full ids in model.json; the decoding loop gets rows
    assert info.special == full.special
    assert info.model_special_tokens().eos_token_ids == tuple(int(np.flatnonzero(kept == e)[0])
                                                              for e in full.special.eos_token_ids)


def test_pruned_logits_equal_the_full_logits_at_the_kept_ids(wide_decoder, pruned):
    from pipeline.engine.decoder_predictor import DecoderPredictor

    kept = load_model_info(pruned.path).vocab_map.kept
    rng = np.random.default_rng(3)
    rows = rng.integers(0, len(kept), (3, 7))
    mask = np.ones((3, 7), np.float32)
    mask[1, :4] = 0
    pos = (np.clip(np.cumsum(mask, 1) - 1, 0, None) * mask).astype(np.int64)
    full = DecoderPredictor(wide_decoder, 3, 8).prefill(kept[rows], pos, mask)
    small = DecoderPredictor(pruned.path, 3, 8).prefill(rows, pos, mask)
    assert small.shape == (3, len(kept))
    np.testing.assert_allclose(small, full[:, kept], atol=1e-4, rtol=0)


def test_greedy_outputs_identical_where_the_kept_set_covers_them(wide_decoder, pruned, data, tmp_path):
    learn = tmp_path / "learn.jsonl"
    learn.write_text("".join(line + "\n" for line in data.read_text().splitlines()
                             if not held_out(json.loads(line)["id"])))
    full, _ = generate(wide_decoder, learn, tmp_path / "full")
    small, _ = generate(pruned.path, learn, tmp_path / "small")
    kept = set(load_model_info(pruned.path).vocab_map.kept.tolist())
    assert full.keys() == small.keys() and len(full) == pruned.learn_rows
    for rid in full:
        a, b = full[rid]["candidates"][0], small[rid]["candidates"][0]
        assert a["token_ids"] == b["token_ids"], rid  # full-vocabulary ids, mapped back
        assert a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]
        assert set(b["token_ids"]) <= kept
    assert any(t >= 3 + 256 for r in small.values() for t in r["candidates"][0]["token_ids"])  # merged tokens too


def test_a_prompt_token_outside_the_kept_set_is_spelled_out_and_counted(wide_decoder, pruned, tmp_path):
    from tokenizers import Tokenizer

    from pipeline.engine.prompt_text import PromptEncoderSpec
    from pipeline.engine.text import TokenizeRequest

    info = load_model_info(pruned.path)
    kept = set(info.vocab_map.kept.tolist())
    text = "zyx wvu qqq"  # letters of the second half of the alphabet: never in the learning data
    src = tmp_path / "new.jsonl"
    src.write_text(json.dumps({"id": "n1", "messages": [{"role": "user", "content": text}]}) + "\n")
    enc = PromptEncoderSpec.of(load_model_info(wide_decoder), 512).build()
    full_ids = enc.run(TokenizeRequest(
        "messages", 0, [[{"role": "user", "content": text}]])).ids[0]
    want_unknown = sum(i not in kept for i in full_ids)
    assert want_unknown > 0
    gens, report = generate(pruned.path, src, tmp_path / "out")
    assert report["tokens"]["unknown_tokens"] == want_unknown
    # spelled with single characters: the prompt the pruned model saw decodes to the same text
    tok = Tokenizer.from_file(str(info.tokenizer_file))
    res = PromptEncoderSpec.of(info, 512).build().run(
        TokenizeRequest(
            "messages", 0, [[{"role": "user", "content": text}]]))
    assert res.unknown_tokens == want_unknown
    assert tok.decode(info.vocab_map.full(res.ids[0]).tolist(), skip_special_tokens=False) == \
        tok.decode(full_ids, skip_special_tokens=False)
    assert len(gens["n1"]["candidates"][0]["token_ids"]) >= 1


def test_a_failing_gate_is_refused_unless_forced(wide_decoder, tmp_path):
    # References = the full model's own outputs: the base scores high, and a model pruned without
    # the learning rows' outputs (outputs_sample=0) generates otherwise on the held-out rows.
    base, _ = generate(wide_decoder, write_rows(tmp_path / "probe.jsonl", 24, seed=5), tmp_path / "base")
    refs = {rid: r["candidates"][0]["text"] or "x" for rid, r in base.items()}
    src = write_rows(tmp_path / "rows.jsonl", 24, seed=5, references=refs)
    out = tmp_path / "pruned"
    with pytest.raises(PruneGateFailed) as e:
        prune_decoder_vocab(wide_decoder, [src], out, outputs_sample=0, max_new_tokens=8, threads=1,
                            max_loss_rate=0.0, cache_root=tmp_path / "cache")
    assert not out.exists() and not e.value.gate.result.passed
    assert e.value.gate.result.identical_rows < e.value.gate.result.rows
    res = prune_decoder_vocab(wide_decoder, [src], out, outputs_sample=0, max_new_tokens=8, threads=1,
                              max_loss_rate=0.0, force=True, cache_root=tmp_path / "cache")
    g = load_model_info(out).gates["pruning"]
    assert g["passed"] is False and g["forced"] is True
    assert res.gate.baseline_cached  # the base model's outputs on the held-out rows were reused
