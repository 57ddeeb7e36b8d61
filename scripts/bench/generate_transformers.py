"""transformers on torch (CPU, fp32): greedy generation of SmolLM2-135M from our dequantized weights.

    .venv-bench/bin/python scripts/bench/generate_transformers.py --weights W.safetensors --config C.json \
        --prompts IDS.json --max-new-tokens 32 --threads 2 --batch 8 --orders unsorted sorted --json OUT.json

Run by scripts/bench_generate.py in `.venv-bench` (torch 2.13 CPU + transformers 4.57; no paddle):

- the model is `LlamaForCausalLM(LlamaConfig(...))` built from --config (the architecture written
  by bench_generate.py from the GGUF: 30 layers, hidden 576, 9/3 heads, RoPE base 1e5, tied
  embeddings) and loaded with --weights, a safetensors file in Hugging Face names and [out, in]
  layout (q/k rows in HF order), written by bench_generate.py from `read_gguf`: the same fp32
  arrays our pipeline and the PaddleNLP baseline run on;
- the prompts are the token ids of the chat-rendered prompts (--prompts, a JSON list of lists),
  left-padded (pad 2) into batches of --batch rows, in input order ("unsorted") and/or sorted by
  length, longest first ("sorted", the order our pipeline batches in);
- `generate(do_sample=False, num_beams=1, max_new_tokens=..., eos_token_id=2, pad_token_id=2)`
  after one untimed warm-up batch; generated tokens are counted per row up to and including the
  first EOS (as our pipeline counts them).

With --prefill-split, the sorted batches are also run with max_new_tokens=1 (the prompt pass
alone), for the prefill / decode split. Writes per order: tokens, seconds, tokens/s, CPU seconds, and the generated ids per prompt (input
order) for the agreement check done by bench_generate.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

from gen_driver import trim  # this folder is on sys.path: the script runs from it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--orders", nargs="+", default=["unsorted", "sorted"], choices=["unsorted", "sorted"])
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa | eager)")
    ap.add_argument("--prefill-split", action="store_true",
                    help="also time the sorted batches with max_new_tokens=1 (the prompt pass alone)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    out: dict = {"python": platform.python_version()}
    try:
        t_start = time.perf_counter()
        import numpy as np
        import torch
        import transformers
        from safetensors.torch import load_file
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.set_num_threads(args.threads)
        out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "numpy": np.__version__}
        out["torch_threads"] = torch.get_num_threads()
        arch = json.load(open(args.config))
        cfg = LlamaConfig(
            vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"],
            intermediate_size=arch["intermediate_size"], num_hidden_layers=arch["num_hidden_layers"],
            num_attention_heads=arch["num_attention_heads"], num_key_value_heads=arch["num_key_value_heads"],
            head_dim=arch["head_dim"], hidden_act="silu", max_position_embeddings=arch["max_position_embeddings"],
            rms_norm_eps=arch["rms_norm_eps"], rope_theta=arch["rope_theta"], tie_word_embeddings=True,
            attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
            torch_dtype="float32", attn_implementation=args.attn)
        with torch.device("cpu"):
            model = LlamaForCausalLM(cfg)
        state = load_file(args.weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embedding
        assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        model.eval()
        out["attn_implementation"] = model.config._attn_implementation
        out["load_seconds"] = round(time.perf_counter() - t_start, 2)
        prompts = json.load(open(args.prompts))
        eos, pad, M = 2, 2, args.max_new_tokens

        def batches(order):
            idx = list(range(len(prompts)))
            if order == "sorted":
                idx.sort(key=lambda i: -len(prompts[i]))
            return [idx[i:i + args.batch] for i in range(0, len(idx), args.batch)]

        def run_batch(rows, new_tokens=M):
            L = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), L), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), L), dtype=torch.long)
            for b, i in enumerate(rows):
                p = prompts[i]
                ids[b, L - len(p):] = torch.tensor(p)
                mask[b, L - len(p):] = 1
            with torch.inference_mode():
                seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                     num_beams=1, eos_token_id=eos, pad_token_id=pad, temperature=None, top_p=None,
                                     top_k=None)
            return [trim(r, eos) for r in seq[:, L:].tolist()], L * len(rows), sum(len(prompts[i]) for i in rows)

        run_batch(list(range(min(args.batch, len(prompts)))))  # warm-up, untimed
        out["orders"] = {}
        for order in args.orders:
            gen: list = [None] * len(prompts)
            padded = real = 0
            c0, t0 = os.times(), time.perf_counter()
            for rows in batches(order):
                toks, p, r = run_batch(rows)
                padded, real = padded + p, real + r
                for i, t in zip(rows, toks):
                    gen[i] = t
            wall = time.perf_counter() - t0
            c1 = os.times()
            n = sum(len(t) for t in gen)
            out["orders"][order] = {
                "generated_tokens": n, "seconds": round(wall, 3), "tokens_per_second": round(n / wall, 2),
                "cpu_seconds": round((c1.user + c1.system) - (c0.user + c0.system), 2),
                "prompt_padding": round(padded / real - 1, 4), "batches": len(batches(order)), "generated": gen}
            print(f"transformers {order}: {n} tokens in {wall:.1f} s = {n / wall:.1f} tokens/s", flush=True)
        if args.prefill_split:
            # The same sorted batches with max_new_tokens=1: the prompt pass (+ one head and argmax)
            # alone, so that the decode share is the sorted total minus this.
            t0 = time.perf_counter()
            for rows in batches("sorted"):
                run_batch(rows, 1)
            out["sorted_prefill_only_seconds"] = round(time.perf_counter() - t0, 3)
    except Exception as e:  # noqa: BLE001 - recorded, not hidden
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()[-3000:]
        print(out["traceback"], file=sys.stderr)
    with open(args.json, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
