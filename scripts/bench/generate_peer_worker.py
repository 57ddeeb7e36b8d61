"""The .venv-bench systems of the generation peer benchmark (`bench_generate.py --peers`).

    .venv-bench/bin/python scripts/bench/generate_peer_worker.py SPEC.json

SPEC (written by scripts/bench/gen_peers.py) names the system, the model files, the prompts (token
ids from our tokenizer), threads, beams and what to measure; the result goes to SPEC["out"]
(scripts/bench/gen_driver.py measures). Systems:

- `transformers`: `LlamaForCausalLM` (sdpa) from the Hugging Face directory `hf_dir`, fp32,
  left-padded batches (pad 2) sorted by length, `generate(do_sample=False, num_beams=...)`;
  EOS ignored with `min_new_tokens` where asked.
- `ct2`: `ctranslate2.Generator` on the converted directory `ct2_dir`, compute type
  `compute_type` (float32 | int8), `generate_batch` on the prompts' token strings (CTranslate2
  takes strings: our ids mapped through its vocabulary, the same list), `include_prompt_in_result
  =False` (the prompt is forwarded at once), `return_end_token=True`; EOS ignored with
  `min_length`.
- `llamacpp`: `llama_cpp.Llama` on a GGUF (`gguf`: the package's native Q4_1 file or the f32 one
  written from the dequantised tensors), one prompt at a time (llama-cpp-python's API decodes one
  sequence per context), `eval(prompt)` then `eval([token])` per step, the next token the argmax
  of the last logits (greedy). llama-cpp-python 0.3.36 has no beam search.

`prepare-hf` mode (`--prepare-hf SAFETENSORS CONFIG TOKENIZER_JSON OUT_DIR [CT2_OUT]`): writes a
Hugging Face Llama directory (config.json, model.safetensors, tokenizer files) from our exported
fp32 weights, and converts it for CTranslate2 (float32, no quantisation at conversion: int8 is
applied at load time by compute_type).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_driver import EOS, run_child, sorted_chunks  # noqa: E402


def _llama_config(arch: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"], intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_hidden_layers"], num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_key_value_heads"], head_dim=arch["head_dim"], hidden_act="silu",
        max_position_embeddings=arch["max_position_embeddings"], rms_norm_eps=arch["rms_norm_eps"],
        rope_theta=arch["rope_theta"], tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS, torch_dtype="float32")


def prepare_hf(weights: str, config: str, tokenizer_json: str, out_dir: str, ct2_out: str | None) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _llama_config(json.loads(Path(config).read_text()))
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embedding
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") == EOS, "the tokenizer's EOS is not id 2"
    tok.save_pretrained(out)
    print(f"wrote {out}", file=sys.stderr)
    if ct2_out:
        import ctranslate2

        shutil.rmtree(ct2_out, ignore_errors=True)
        ctranslate2.converters.TransformersConverter(str(out)).convert(ct2_out, quantization=None, force=True)
        print(f"wrote {ct2_out}", file=sys.stderr)


class Transformers:
    def __init__(self, spec: dict):
        import torch
        from transformers import LlamaForCausalLM

        torch.set_num_threads(spec["threads"])
        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(spec["hf_dir"], torch_dtype=torch.float32,
                                                      attn_implementation="sdpa").eval()
        assert self.model.lm_head.weight.data_ptr() == self.model.model.embed_tokens.weight.data_ptr(), "head not tied"

    def generate(self, prompts, max_new_tokens, beams, batch, force_length):
        torch = self.torch
        gen: list = [None] * len(prompts)
        for rows in sorted_chunks(prompts, batch):
            L = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), L), EOS, dtype=torch.long)
            mask = torch.zeros((len(rows), L), dtype=torch.long)
            for b, i in enumerate(rows):
                ids[b, L - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[b, L - len(prompts[i]):] = 1
            kw = dict(min_new_tokens=max_new_tokens) if force_length else {}
            if beams > 1:
                kw.update(num_beams=beams, length_penalty=1.0, early_stopping=False)
            with torch.inference_mode():
                seq = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          do_sample=False, eos_token_id=EOS, pad_token_id=EOS, temperature=None,
                                          top_p=None, top_k=None, **kw)
            for i, r in zip(rows, seq[:, L:].tolist()):
                gen[i] = r
        return gen


class CTranslate2:
    def __init__(self, spec: dict):
        import ctranslate2

        d = Path(spec["ct2_dir"])
        vocab_file = d / "vocabulary.json"
        if vocab_file.is_file():
            self.vocab = json.loads(vocab_file.read_text())
        else:
            self.vocab = (d / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
        self.gen = ctranslate2.Generator(str(d), device="cpu", compute_type=spec["compute_type"],
                                         intra_threads=spec["threads"], inter_threads=1)
        self.compute_type = spec["compute_type"]

    def generate(self, prompts, max_new_tokens, beams, batch, force_length):
        gen: list = [None] * len(prompts)
        for rows in sorted_chunks(prompts, batch):
            toks = [[self.vocab[t] for t in prompts[i]] for i in rows]
            res = self.gen.generate_batch(toks, max_length=max_new_tokens, min_length=max_new_tokens if force_length
                                          else 0, beam_size=beams, sampling_topk=1, length_penalty=1.0,
                                          include_prompt_in_result=False, return_end_token=True)
            for i, r in zip(rows, res):
                gen[i] = list(r.sequences_ids[0])
        return gen


class LlamaCpp:
    def __init__(self, spec: dict):
        import numpy as np
        from llama_cpp import Llama

        self.np = np
        self.llm = Llama(model_path=spec["gguf"], n_ctx=spec["n_ctx"], n_batch=512, n_threads=spec["threads"],
                         n_threads_batch=spec["threads"], logits_all=False, verbose=False)

    def generate(self, prompts, max_new_tokens, beams, batch, force_length):
        if beams != 1:
            raise NotImplementedError("llama-cpp-python 0.3.36 has no beam search (greedy and sampling only)")
        np, llm = self.np, self.llm
        n_vocab = llm.n_vocab()

        def last_logits():
            # llama-cpp-python 0.3.36 no longer copies the logits into llm.scores without
            # logits_all (its sampler reads them in C); read the context's last row directly.
            return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

        gen = []
        for p in prompts:  # one sequence per context: llama-cpp-python's API has no batched decoding
            llm.reset()
            llm.eval(p)
            out = []
            for k in range(max_new_tokens):
                t = int(np.argmax(last_logits()))
                out.append(t)
                if (t == EOS and not force_length) or k == max_new_tokens - 1:
                    break
                llm.eval([t])
            gen.append(out)
        return gen


def build(spec: dict):
    from importlib import metadata

    def v(n):
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            return None

    system = spec["system"]
    if system == "transformers":
        b = Transformers(spec)
        return b, {"versions": {"transformers": v("transformers"), "torch": v("torch")}}
    if system == "ct2":
        b = CTranslate2(spec)
        return b, {"versions": {"ctranslate2": v("ctranslate2")}, "compute_type": b.compute_type}
    if system == "llamacpp":
        b = LlamaCpp(spec)
        return b, {"versions": {"llama-cpp-python": v("llama-cpp-python")}, "gguf": spec["gguf"]}
    raise ValueError(f"unknown system {system!r}")


if __name__ == "__main__":
    if sys.argv[1] == "--prepare-hf":
        prepare_hf(*sys.argv[2:6], sys.argv[6] if len(sys.argv) > 6 else None)
    else:
        run_child(build, sys.argv[1])
