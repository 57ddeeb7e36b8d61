"""Regenerate tests/fixtures/decoders/: tiny random Hugging Face decoders + torch reference outputs.

Runs in the reference venv (transformers + torch, no paddle), never in the tests:

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r requirements-reference.txt
    .venv-bench/bin/python scripts/make_decoder_fixtures.py

For each model (a fixed seed each) it writes `tests/fixtures/decoders/<name>/`:
- `config.json`, `generation_config.json`, `model.safetensors` from `save_pretrained` (the
  weights in the dtype named below: bf16 like the real ERNIE 4.5 releases, or fp16, to keep the
  fixture small; the reference is computed in float32 on exactly those rounded values);
- `tokenizer.json` (a WordLevel tokenizer over the model's 128 ids) and `tokenizer_config.json`
  (special tokens, a chat template), so the loader has a complete checkpoint;
- `reference.npz`: a left-padded batch of 3 prompts (`input_ids`, `attention_mask`), the
  float32 logits of the prompt forward pass `logits` [B, L, V] with position ids
  cumsum(mask) - 1 (EET's pre-padding), and `greedy` [B, 64]: 64 greedy tokens per row from
  `model.generate(do_sample=False)` with eos disabled, checked here against a plain argmax loop
  of full forward passes. `min_margin` is the smallest top-1 minus top-2 logit along the greedy
  path (the tolerance a port has before a greedy choice can flip).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Ernie4_5Config,
    Ernie4_5ForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "decoders"
VOCAB = 128
PAD, BOS, EOS, UNK = 0, 1, 2, 3
PROMPT_LENGTHS = [5, 12, 8]
NEW_TOKENS = 64
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")

SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
             pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)

FIXTURES = {
    # ERNIE 4.5 0.3B's shape of config in miniature: tied head, no biases, head_dim 16 != 32 / 4.
    "ernie4_5_tied": (Ernie4_5ForCausalLM, Ernie4_5Config(
        **SMALL, head_dim=16, use_bias=False, tie_word_embeddings=True, rope_theta=500000.0,
        rms_norm_eps=1e-5), torch.bfloat16, 0),
    # use_bias (q/k/v/o and the MLP), a separate head, head_dim = hidden / heads.
    "ernie4_5_bias_untied": (Ernie4_5ForCausalLM, Ernie4_5Config(
        **SMALL, head_dim=8, use_bias=True, tie_word_embeddings=False, rope_theta=10000.0,
        rms_norm_eps=1e-6), torch.float16, 1),
    # Llama, GQA, untied head; eos given as a list in generation_config.json (as Llama 3 does).
    "llama_gqa": (LlamaForCausalLM, LlamaConfig(
        **SMALL, tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5),
        torch.float16, 2),
}
EOS_LISTS = {"llama_gqa": [EOS, 5]}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that greedy choices are not near-ties (HF's init std is 0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):  # logits ~ a tied head's
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:  # torch Linear [out, in]
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def tokenizer() -> Tokenizer:
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(len(specials), VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB
    return tok


def prompts(seed: int):
    rng = np.random.default_rng(100 + seed)
    L = max(PROMPT_LENGTHS)
    ids = np.full((len(PROMPT_LENGTHS), L), PAD, np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(PROMPT_LENGTHS):
        ids[b, L - n:] = rng.integers(4, VOCAB, n)  # no special tokens inside prompts
        mask[b, L - n:] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


def argmax_loop(model, ids, mask):
    """Greedy by full forward passes (no cache): the plainest reference for generate()."""
    toks, margins = [], []
    for _ in range(NEW_TOKENS):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1]
        top2 = logits.topk(2, dim=-1).values
        margins.append((top2[:, 0] - top2[:, 1]).min().item())
        tok = logits.argmax(-1, keepdim=True)
        toks.append(tok)
        ids = torch.cat([ids, tok], 1)
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
    return torch.cat(toks, 1), min(margins)


MIN_MARGIN = 0.005  # 50x the logit tolerance of the tests; a seed with a closer top-2 on its greedy path is skipped


def build(cls, cfg, dtype, seed: int):
    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    randomize(model, seed)
    # Round the parameters to the stored dtype; the reference is float32 on the rounded values.
    # (Not `model.to(dtype)`: that would round the rotary inv_freq buffer too.)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    return model


def make(name: str, cls, cfg, dtype, seed: int) -> None:
    """The first seed from `seed` on (step 100) whose greedy path has no near-tie."""
    while True:
        model = build(cls, cfg, dtype, seed)
        ids, mask = prompts(seed)
        with torch.no_grad():
            _, margin = argmax_loop(model, ids, mask)
        if margin >= MIN_MARGIN:
            break
        print(f"{name}: seed {seed} has a near-tie on its greedy path ({margin:.2e}), next seed")
        seed += 100

    d = OUT / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    copy.deepcopy(model).to(dtype).save_pretrained(d, safe_serialization=True)
    if name in EOS_LISTS:
        gc = json.loads((d / "generation_config.json").read_text())
        gc["eos_token_id"] = EOS_LISTS[name]
        (d / "generation_config.json").write_text(json.dumps(gc, indent=2) + "\n")
    tokenizer().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
        "model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        loop, margin = argmax_loop(model, ids, mask)
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                   pad_token_id=PAD, bos_token_id=BOS)
        gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, ids.shape[1]:]
    assert gen.shape == (len(PROMPT_LENGTHS), NEW_TOKENS), gen.shape
    if not torch.equal(gen, loop):
        bad = (gen != loop).nonzero()
        raise SystemExit(f"{name}: generate() and the argmax loop disagree at {bad[:4].tolist()}, margin {margin}")
    np.savez_compressed(d / "reference.npz", input_ids=ids.numpy(), attention_mask=mask.numpy(),
                        logits=logits.numpy().astype(np.float32), greedy=gen.numpy().astype(np.int64),
                        min_margin=np.float32(margin), seed=np.int64(seed))
    size = sum(f.stat().st_size for f in d.iterdir())
    print(f"{name}: seed {seed}, {size / 1024:.0f} KB, min top-1/top-2 margin on the greedy path {margin:.4f}")


def main() -> None:
    for name, (cls, cfg, dtype, seed) in FIXTURES.items():
        make(name, cls, cfg, dtype, seed)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"total {total / 1024:.0f} KB in {OUT}")


if __name__ == "__main__":
    main()
