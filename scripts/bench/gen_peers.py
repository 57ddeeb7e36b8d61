"""Generation peers, side by side in one run: `python scripts/bench_generate.py --peers` (issue 16).

    python scripts/bench_generate.py --peers [--systems ours paddlenlp transformers ct2-float32 ct2-int8
        llamacpp-q4_1 llamacpp-f32] [--prompts 32] [--max-new-tokens 32] [--beams 1 4] [--threads 2 1]
        [--step-batches 1 8 32] [--baseline-prompts 8] [--ours NAME DIR PRECISION ...]
        [--json docs/benchmarks-generate.json] [--chart docs/benchmarks-generate.png]

Every system runs in its own process, with the same prompts (the sample's first --prompts rows,
rendered with the GGUF's chat template and tokenized by our tokenizer: the same token ids for all),
the same weights (SmolLM2-135M-Instruct's Q4_1 GGUF dequantised to fp32, or that GGUF itself for
llama.cpp Q4_1), the same threads and the same decoding (greedy; beam search with --beams > 1):

- ours: `Generator.generate` (the engine `python -m pipeline generate` runs) on the default
  converted model, fp32; `--ours NAME DIR PRECISION` adds variants (another model directory,
  e.g. a pruned one, and/or another --precision);
- paddlenlp: PaddleNLP 2.8.1 dynamic-graph `LlamaForCausalLM.generate` (the plain baseline), on
  the first --baseline-prompts prompts only (it is about 10x slower);
- transformers: transformers on torch, fp32, sdpa (scripts/bench/generate_peer_worker.py);
- ct2-float32 / ct2-int8: CTranslate2's `Generator` on the Hugging Face checkpoint written from
  the same weights, compute_type float32 / int8;
- llamacpp-q4_1 / llamacpp-f32: llama.cpp through llama-cpp-python (built from source in
  .venv-bench), on the package's Q4_1 GGUF and on an f32 GGUF written from its dequantised
  tensors (`write_f32_gguf`), one prompt at a time.

What each run measures is in scripts/bench/gen_driver.py: decode ms per step at each
--step-batches batch (greedy, EOS ignored, T(M) - T(1) over M - 1 steps), the best batch (lowest
ms per row-step), the whole sample at that batch (generated tokens/s), peak RSS; here: ROUGE-L F1
against the sample's references (pipeline.tasks.text_metrics) and the share of rows identical to
ours fp32 greedy at the same thread count.

The memory-bandwidth bound: this machine's read bandwidth, measured here at 1 and 2 threads (a C
streaming read over a 1 GiB buffer, compiled with the system's gcc, OpenMP; numpy's sum as a
1-thread cross-check), and the bytes one batch-1 decode step must read (every weight once: the
weights file of the model directory, the tied head included once, + the key/value cache at the
measured prompts' mean context); bound = bytes / bandwidth; ours at batch 1 is compared with it.

A system that fails is recorded with its error; nothing is estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from gen_driver import EOS, run_child  # noqa: E402

BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
WORKER = HERE / "generate_peer_worker.py"
SAMPLE = ROOT / "data" / "generate" / "prompts.jsonl"
PEERS = ("ours", "paddlenlp", "transformers", "ct2-float32", "ct2-int8", "llamacpp-q4_1", "llamacpp-f32")
PRECISION = {"ours": "fp32", "paddlenlp": "fp32", "transformers": "fp32", "ct2-float32": "fp32",
             "ct2-int8": "int8", "llamacpp-q4_1": "q4_1", "llamacpp-f32": "fp32"}


# ----------------------------------------------------------------------------- our venv's systems


class Ours:
    """Our Generator. One Generator (predictors sized for the longest call) per batch size; the
    1-token timing calls and the EOS-ignoring ones swap the decoding settings of that Generator
    (a benchmark-only shortcut: the predictors were sized for max_new_tokens, which a shorter
    call fits), so that a timing pair runs on the same predictors."""

    def __init__(self, spec: dict):
        import zlib  # noqa: F401 - before paddle

        from pipeline.engine.modeldir import load_model_info

        self.info = load_model_info(spec["model_dir"])
        self.spec = spec
        self.key = self.gen = None

    def _generator(self, rows: int, beams: int):
        from pipeline.config import GenerationOptions, RunConfig, resolve
        from pipeline.engine.generator import Generator

        if self.key != (rows, beams):
            if self.gen is not None:
                self.gen.close()
            self.gen = None  # the old predictors go before the new ones are built
            s = self.spec
            cfg = RunConfig(mode="generate", model=Path(s["model_dir"]), max_batch_size=rows, workers=0,
                            threads=s["threads"], streams=1, precision=s["precision"],
                            generation=GenerationOptions(max_new_tokens=s["max_new_tokens"], num_beams=beams))
            self.settings = resolve(cfg, self.info).generator
            self.gen, self.key = Generator(self.info, self.settings), (rows, beams)
        return self.gen

    def generate(self, prompts, max_new_tokens, beams, batch, force_length):
        gen = self._generator(batch * beams, beams)
        d = self.settings.decoding
        gen.settings = replace(self.settings, decoding=replace(
            d, max_new_tokens=max_new_tokens, eos_token_ids=() if force_length else d.eos_token_ids))
        cands, _ = gen.generate(prompts)
        return [list(c[0].token_ids) for c in cands]


class PaddleNLP:
    """PaddleNLP 2.8.1 dygraph LlamaForCausalLM.generate on our fp32 weights (the plain baseline)."""

    def __init__(self, spec: dict):
        import zlib  # noqa: F401 - before paddle

        import numpy as np
        import paddle
        from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

        from pipeline.convert.decoder import position_ids_from_mask
        from pipeline.convert.gguf_checkpoint import default_gguf_path, read_gguf

        paddle.set_device("cpu")
        ck = read_gguf(default_gguf_path())
        c = ck.config
        self.model = LlamaForCausalLM(LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
            max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
            use_flash_attention=False, use_fused_rms_norm=False, use_fused_rope=False, pad_token_id=EOS,
            bos_token_id=1, eos_token_id=EOS))
        state = {"llama." + k: v for k, v in ck.weights.items()}
        # PaddleNLP's head is [H, V] and cannot share the [V, H] embedding: it gets the transpose.
        state["lm_head.weight"] = np.ascontiguousarray(ck.weights["embed_tokens.weight"].T)
        self.model.set_state_dict(state)
        self.model.eval()
        self.np, self.paddle, self.position_ids_from_mask = np, paddle, position_ids_from_mask

    def generate(self, prompts, max_new_tokens, beams, batch, force_length):
        from gen_driver import sorted_chunks

        np, paddle = self.np, self.paddle
        gen: list = [None] * len(prompts)
        for rows in sorted_chunks(prompts, batch):
            L = max(len(prompts[i]) for i in rows)
            ids = np.full((len(rows), L), EOS, np.int64)
            mask = np.zeros((len(rows), L), np.int64)
            for b, i in enumerate(rows):
                ids[b, L - len(prompts[i]):], mask[b, L - len(prompts[i]):] = prompts[i], 1
            mask_t = paddle.to_tensor(mask)
            kw = dict(decode_strategy="beam_search", num_beams=beams, length_penalty=1.0) if beams > 1 else \
                dict(decode_strategy="greedy_search")
            if force_length:
                kw["min_length"] = max_new_tokens
            with paddle.no_grad():
                out, _ = self.model.generate(input_ids=paddle.to_tensor(ids), attention_mask=mask_t,
                                             position_ids=self.position_ids_from_mask(mask_t),
                                             max_new_tokens=max_new_tokens, eos_token_id=EOS, pad_token_id=EOS,
                                             use_cache=True, **kw)
            for i, r in zip(rows, out.numpy().tolist()):
                gen[i] = r
        return gen


def build_main(spec: dict):
    from importlib import metadata

    if spec["system"] == "ours":
        b = Ours(spec)
        return b, {"versions": {"paddlepaddle": metadata.version("paddlepaddle")}, "model_dir": spec["model_dir"],
                   "precision": spec["precision"]}
    if spec["system"] == "paddlenlp":
        return PaddleNLP(spec), {"versions": {"paddlenlp": metadata.version("paddlenlp"),
                                              "paddlepaddle": metadata.version("paddlepaddle")}}
    raise ValueError(f"unknown system {spec['system']!r}")


# ----------------------------------------------------------------------------- artefacts


def write_f32_gguf(src: Path, dst: Path) -> dict:
    """The GGUF with every tensor dequantised to F32 (llama.cpp's own layout kept: q/k rows stay in
    its permuted order, as llama.cpp expects), every metadata field copied, file_type ALL_F32."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, Keys
    from gguf.quants import dequantize

    reader = GGUFReader(str(src))
    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    tmp = dst.with_suffix(".tmp")
    writer = GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        if field.name == Keys.General.FILE_TYPE:
            writer.add_key_value(field.name, 0, GGUFValueType.UINT32)  # LLAMA_FTYPE_ALL_F32
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    arrays = []
    for t in reader.tensors:
        a = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        assert a.shape == tuple(reversed([int(x) for x in t.shape])), (t.name, a.shape, t.shape)
        arrays.append((t.name, a))
        writer.add_tensor_info(t.name, a.shape, a.dtype, a.nbytes, GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, a in arrays:
        writer.write_tensor_data(a)
    writer.close()
    os.replace(tmp, dst)
    return {"tensors": len(arrays), "parameters": int(sum(a.size for _, a in arrays)), "bytes": dst.stat().st_size}


def prepare(cache: Path, info, tmp: Path, systems: list[str]) -> dict:
    """The model files the chosen peers need, made once into `cache` (reused while they exist)."""
    from pipeline.convert.gguf_checkpoint import default_gguf_path

    out: dict = {"gguf_q4_1": str(default_gguf_path())}
    cache.mkdir(parents=True, exist_ok=True)
    f32 = cache / "smollm2-135m-f32.gguf"
    if "llamacpp-f32" in systems and not f32.is_file():
        print("-- writing the f32 GGUF", flush=True)
        out["f32_written"] = write_f32_gguf(default_gguf_path(), f32)
    out["gguf_f32"] = str(f32)
    hf, ct2 = cache / "hf", cache / "ct2-float32"
    need_hf = any(s == "transformers" or s.startswith("ct2-") for s in systems)
    if need_hf and not (ct2 / "model.bin").is_file() and BENCH_PYTHON.is_file():
        print("-- writing the Hugging Face checkpoint and the CTranslate2 conversion", flush=True)
        exp = tmp / "export"
        exp.mkdir(exist_ok=True)
        # bench_generate.py's export: our fp32 arrays in HF names and [out, in] layout (q/k in HF order).
        p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_generate.py"), "--child", "export-hf",
                            "--export-hf", str(exp), "--json", str(tmp / "export.json")], cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
        assert p.returncode == 0 and "error" not in json.loads((tmp / "export.json").read_text()), p.stderr[-2000:]
        p = subprocess.run([str(BENCH_PYTHON), str(WORKER), "--prepare-hf", str(exp / "model.safetensors"),
                            str(exp / "config.json"), str(Path(info.path) / "tokenizer.json"), str(hf), str(ct2)],
                           cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
    out["hf_dir"], out["ct2_dir"] = str(hf), str(ct2)
    return out


# ----------------------------------------------------------------------------- bandwidth

_STREAM_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
int main(int argc, char **argv) {
    size_t n = (size_t)atoll(argv[1]) / 8; int reps = atoi(argv[2]);
    uint64_t *a = aligned_alloc(64, n * 8);
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = i;  /* first touch by the thread that reads it */
    double best = 1e30; uint64_t s = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = omp_get_wtime();
        #pragma omp parallel for schedule(static) reduction(+:s)
        for (size_t i = 0; i < n; i++) s += a[i];
        double dt = omp_get_wtime() - t0;
        if (dt < best) best = dt;
    }
    printf("%.3f %d %llu\n", n * 8 / best / 1e9, omp_get_max_threads(), (unsigned long long)s);
    return 0;
}
"""


def read_bandwidth(threads: list[int], tmp: Path, gib: float = 1.0, reps: int = 7) -> dict:
    """GB/s (1e9 bytes) of a streaming read of a `gib` GiB buffer (far larger than any cache), the
    best of `reps` passes, per thread count; plus numpy's single-threaded sum as a cross-check."""
    import numpy as np

    out: dict = {"buffer_bytes": int(gib * 2**30), "passes": reps, "method": "C (gcc -O3 -march=native -fopenmp) "
                 "sum of a uint64 buffer, best pass", "gb_per_s": {}}
    src, exe = tmp / "stream.c", tmp / "stream"
    src.write_text(_STREAM_C)
    cc = subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", str(src), "-o", str(exe)], capture_output=True,
                        text=True)
    if cc.returncode == 0:
        for t in threads:
            p = subprocess.run([str(exe), str(out["buffer_bytes"]), str(reps)], capture_output=True, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS=str(t)), check=True)
            gbs, got_threads, _ = p.stdout.split()
            assert int(got_threads) == t, f"asked {t} threads, OpenMP ran {got_threads}"
            out["gb_per_s"][str(t)] = float(gbs)
    else:
        out["c_error"] = cc.stderr[-1000:]
    a = np.arange(out["buffer_bytes"] // 8, dtype=np.uint64)
    best = 1e30
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    out["numpy_sum_1_thread_gb_per_s"] = round(a.nbytes / best / 1e9, 3)
    del a
    if not out["gb_per_s"]:  # no compiler: numpy's figure stands for 1 thread, none for more
        out["gb_per_s"]["1"] = out["numpy_sum_1_thread_gb_per_s"]
    return out


def step_bytes(info, context: float) -> dict:
    """Bytes one batch-1 decode step reads: every weight once (the weights file: the tied head is
    stored once and read once per step by the head; the embedding lookup reads one row, counted
    within that) + the key/value cache of `context` columns (fp32)."""
    weights = sum(p.stat().st_size for p in Path(info.path).glob("*.pdiparams"))
    kv = info.num_hidden_layers * 2 * info.num_key_value_heads * info.head_dim * 4 * context
    return {"weights_bytes": weights, "kv_bytes_at_context": int(kv), "context": context,
            "bytes": int(weights + kv)}


# ----------------------------------------------------------------------------- the parent


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               FLAGS_paddle_num_threads=str(threads), GLOG_minloglevel="2", PYTHONPATH=str(ROOT))
    return env


def run_spec(spec: dict, python: str, script: Path, timeout: float) -> dict:
    path = Path(spec["out"]).with_suffix(".spec.json")
    path.write_text(json.dumps(spec))
    la0, t0 = os.getloadavg()[0], time.perf_counter()
    try:
        p = subprocess.run([python, str(script), "--child", str(path)] if script != WORKER else [python, str(script),
                           str(path)], cwd=ROOT, env=child_env(spec["threads"]), capture_output=True, text=True,
                           timeout=timeout)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = None, f"timed out after {timeout:.0f} s\n{e.stderr or ''}"
    res = json.loads(Path(spec["out"]).read_text()) if Path(spec["out"]).is_file() else {}
    if not res and rc == 0:
        res["error"] = "the child wrote no result"
    if rc != 0 and "error" not in res:
        res["error"] = f"exit code {rc}" if rc is not None else f"timed out after {timeout:.0f} s"
    if "error" in res:
        res["stderr_tail"] = str(err)[-2000:]
        print(f"   failed: {res['error']}\n{str(err)[-600:]}", flush=True)
    res["process"] = {"wall_seconds": round(time.perf_counter() - t0, 1), "load_before": round(la0, 2),
                      "load_after": round(os.getloadavg()[0], 2)}
    return res


def systems_to_run(args, info, files: dict) -> list[dict]:
    """One entry per system: name, precision, the spec fields and how to launch it."""
    out = []
    main = (sys.executable, Path(__file__).resolve())
    bench = (str(BENCH_PYTHON), WORKER)
    sb = args.step_batches
    for name in args.systems:
        if name == "ours":
            out.append({"name": "ours fp32", "family": "ours", "precision": "fp32", "launch": main,
                        "spec": {"system": "ours", "model_dir": str(info.path), "precision": "fp32",
                                 "step_batches": sb}})
            for vname, vdir, vprec in args.ours:
                out.append({"name": f"ours {vname}", "family": "ours", "precision": vprec, "launch": main,
                            "spec": {"system": "ours", "model_dir": str(Path(vdir).resolve()), "precision": vprec,
                                     "step_batches": sb}})
        elif name == "paddlenlp":
            out.append({"name": "PaddleNLP dygraph", "family": "baseline", "precision": "fp32", "launch": main,
                        "baseline": True, "spec": {"system": "paddlenlp", "step_batches": [b for b in sb if b <= 8]}})
        elif name == "transformers":
            out.append({"name": "transformers/torch", "family": "peer", "precision": "fp32", "launch": bench,
                        "spec": {"system": "transformers", "hf_dir": files["hf_dir"], "step_batches": sb}})
        elif name.startswith("ct2-"):
            ct = name.split("-", 1)[1]
            out.append({"name": f"CTranslate2 {ct}", "family": "peer", "precision": PRECISION[name], "launch": bench,
                        "spec": {"system": "ct2", "ct2_dir": files["ct2_dir"], "compute_type": ct,
                                 "step_batches": sb}})
        elif name.startswith("llamacpp-"):
            q = name.split("-", 1)[1]
            out.append({"name": f"llama.cpp {q.upper()}", "family": "peer", "precision": PRECISION[name],
                        "launch": bench, "spec": {"system": "llamacpp", "gguf": files[f"gguf_{q}"], "n_ctx": 1024,
                                                  "step_batches": [1]}})
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_generate.py --peers", description=__doc__.split("\n")[0])
    ap.add_argument("--peers", action="store_true")
    ap.add_argument("--systems", nargs="+", default=list(PEERS), choices=PEERS)
    ap.add_argument("--prompts", type=int, default=32, help="the sample's first N prompts")
    ap.add_argument("--baseline-prompts", type=int, default=8, help="PaddleNLP's dygraph baseline runs the first N")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--step-batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--ours", nargs=3, action="append", default=[], metavar=("NAME", "MODEL_DIR", "PRECISION"),
                    help="one more variant of ours: a model directory and a --precision (repeatable)")
    ap.add_argument("--input", type=Path, default=SAMPLE)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench_out" / "gen-peers-cache",
                    help="where the f32 GGUF, the HF checkpoint and the CTranslate2 conversion are kept")
    ap.add_argument("--timeout", type=float, default=1800, help="per system run, seconds")
    ap.add_argument("--json", type=Path, default=ROOT / "bench_out" / "generate-peers.json")
    ap.add_argument("--chart", type=Path, default=None, help="PNG of tokens/s per system (matplotlib)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--render", type=Path, default=None,
                    help="redo the targets, the table and the chart from a saved --json result (no runs)")
    args = ap.parse_args(argv)
    if args.child:
        run_child(build_main, args.child)
        return 0
    if args.render:
        from pipeline.cli import default_generation_model

        report = json.loads(args.render.read_text())
        targets_and_bound(report, default_generation_model())
        report["table"] = render(report)
        print(report["table"])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"JSON: {args.json}")
        if args.chart:
            chart(report, args.chart)
            print(f"chart: {args.chart}")
        return 0

    from pipeline.cli import default_generation_model
    from pipeline.engine.prompt_text import PromptEncoderSpec
    from pipeline.engine.text import TokenizeRequest
    from pipeline.tasks.text_metrics import generation_metrics
    from tokenizers import Tokenizer

    t_all = time.perf_counter()
    info = default_generation_model()
    rows = [json.loads(line) for line in args.input.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:args.prompts]
    enc = PromptEncoderSpec.of(info, min(512, info.max_seq_len - args.max_new_tokens)).build().run(
        TokenizeRequest("messages", 0, [r["messages"] for r in rows]))
    assert not enc.failed and not enc.truncated, (enc.failed, enc.truncated)
    ids = [list(map(int, x)) for x in enc.ids]
    refs = [[r["reference"]] if isinstance(r.get("reference"), str) else list(r.get("reference") or []) for r in rows]
    tok = Tokenizer.from_file(str(Path(info.path) / "tokenizer.json"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-peers-"))
    try:
        (tmp / "ids.json").write_text(json.dumps(ids))
        nb = min(args.baseline_prompts, len(ids))
        (tmp / "ids_baseline.json").write_text(json.dumps(ids[:nb]))
        load0 = os.getloadavg()
        report: dict = {
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF; dequantised fp32)",
            "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
            "prompts": len(ids), "baseline_prompts": nb, "max_new_tokens": args.max_new_tokens,
            "beams": args.beams, "threads": args.threads, "step_batches": args.step_batches,
            "prompt_tokens": {"total": sum(map(len, ids)), "min": min(map(len, ids)), "max": max(map(len, ids))},
            "load_start": [round(x, 2) for x in load0], "runs": []}
        print(f"CPU {report['cpu']['model']}, {report['cpu']['cores']} cores, load {report['load_start']}; "
              f"{len(ids)} prompts ({report['prompt_tokens']}), {args.max_new_tokens} new tokens", flush=True)
        print("-- read bandwidth", flush=True)
        report["bandwidth"] = read_bandwidth(sorted(set(args.threads)), tmp)
        print(f"   {report['bandwidth']['gb_per_s']} GB/s (numpy 1 thread "
              f"{report['bandwidth']['numpy_sum_1_thread_gb_per_s']})", flush=True)
        files = prepare(args.cache, info, tmp, args.systems)
        report["files"] = files
        systems = systems_to_run(args, info, files)
        for threads in args.threads:
            for s in systems:
                best_rows = None
                for beams in args.beams:
                    name = f"{s['name']}, {threads} thr, " + ("greedy" if beams == 1 else f"beam {beams}")
                    print(f"-- {name} (load {os.getloadavg()[0]:.2f})", flush=True)
                    if s["launch"][1] == WORKER and not BENCH_PYTHON.is_file():
                        res = {"error": f"{BENCH_PYTHON} not found (python3.11 -m venv .venv-bench && .venv-bench/"
                                        f"bin/pip install -r requirements-bench.txt -r requirements-bench-generate.txt)"}
                    elif s["spec"]["system"] == "llamacpp" and beams > 1:
                        res = {"not_offered": "llama-cpp-python 0.3.36 has no beam search"}
                    else:
                        spec = dict(s["spec"], threads=threads, beams=beams, max_new_tokens=args.max_new_tokens,
                                    prompts=str(tmp / ("ids_baseline.json" if s.get("baseline") else "ids.json")),
                                    out=str(tmp / f"run{len(report['runs'])}.json"))
                        if beams > 1:
                            spec["step_batches"] = []
                            spec["sample_batch"] = best_rows or 8
                        res = run_spec(spec, s["launch"][0], s["launch"][1], args.timeout)
                        if beams == 1 and "best_step_batch" in res:
                            best_rows = res["best_step_batch"]
                    n_rows = nb if s.get("baseline") else len(ids)
                    if "generated" in res:
                        hyps = [tok.decode([t for t in g if t != EOS], skip_special_tokens=True).strip()
                                for g in res["generated"]]
                        m = generation_metrics(hyps, refs[:n_rows])
                        res["rouge_l"] = round(m["rouge_l"], 4) if m else None
                    report["runs"].append({"system": s["name"], "family": s["family"], "precision": s["precision"],
                                           "threads": threads, "beams": beams, "rows": n_rows, **res})
        report["load_end"] = [round(x, 2) for x in os.getloadavg()]
        # Bandwidth again at the end (it varies on this VM); the bound uses the higher of the two.
        report["bandwidth_end"] = read_bandwidth(sorted(set(args.threads)), tmp)
        print(f"-- read bandwidth at the end: {report['bandwidth_end']['gb_per_s']} GB/s", flush=True)
        report["seconds_total"] = round(time.perf_counter() - t_all, 1)
        analyse(report, info)
        for r in report["runs"]:
            r.pop("generated", None)
        table = render(report)
        report["table"] = table
        print("\n" + table, flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"JSON: {args.json}")
        if args.chart:
            chart(report, args.chart)
            print(f"chart: {args.chart}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def analyse(report: dict, info) -> None:
    """Agreement with ours fp32 greedy, the 1.3x target at equal precision, the bandwidth bound."""
    runs = report["runs"]
    ok = [r for r in runs if "tokens_per_second" in r]
    # Rows identical to ours fp32 with the same decoding and threads (greedy against greedy, beam
    # against beam); PaddleNLP's rows are the first --baseline-prompts, compared with those.
    for threads in report["threads"]:
        for beams in report["beams"]:
            ref = next((r for r in ok if r["system"] == "ours fp32" and r["threads"] == threads
                        and r["beams"] == beams), None)
            for r in ok:
                if ref is not None and r["threads"] == threads and r["beams"] == beams:
                    n = min(len(r["generated"]), len(ref["generated"]))
                    same = sum(a == b for a, b in zip(r["generated"][:n], ref["generated"][:n]))
                    r["identical_to_ours_fp32"] = {"rows": n, "identical": same}
    targets_and_bound(report, info)


def best_bandwidth(report: dict) -> dict[str, float]:
    """Per thread count, the highest read rate measured with at most that many threads (start and
    end, C and numpy): bandwidth on this VM varies from one minute to the next, and the highest
    figure gives the tightest (least flattering) bound."""
    seen = []
    for key in ("bandwidth", "bandwidth_end"):
        bw = report.get(key) or {}
        seen += [(int(t), g) for t, g in bw.get("gb_per_s", {}).items()]
        if "numpy_sum_1_thread_gb_per_s" in bw:
            seen.append((1, bw["numpy_sum_1_thread_gb_per_s"]))
    return {str(t): max(g for k, g in seen if k <= t) for t in report["threads"] if any(k <= t for k, _ in seen)}


def targets_and_bound(report: dict, info) -> None:
    """The 1.3x target at equal precision and the bandwidth bound (from the runs' figures only, so
    that `--render JSON` can redo it from a saved result)."""
    ok = [r for r in report["runs"] if "tokens_per_second" in r]
    targets = []
    for threads in report["threads"]:
        for beams in report["beams"]:
            ours = next((r for r in ok if r["system"] == "ours fp32" and r["threads"] == threads and r["beams"] == beams),
                        None)
            peers = [r for r in ok if r["family"] == "peer" and r["precision"] == "fp32" and r["threads"] == threads
                     and r["beams"] == beams]
            if ours and peers:
                best = max(peers, key=lambda r: r["tokens_per_second"])
                ratio = ours["tokens_per_second"] / best["tokens_per_second"]
                targets.append({"threads": threads, "beams": beams, "fastest_fp32_peer": best["system"],
                                "peer_tokens_per_second": best["tokens_per_second"],
                                "ours_tokens_per_second": ours["tokens_per_second"], "ratio": round(ratio, 2),
                                "target": 1.3, "met": ratio >= 1.3})
    report["target_sample_vs_fastest_fp32_peer"] = targets
    bw = best_bandwidth(report)
    report["bandwidth_used_for_bound_gb_per_s"] = bw
    bound = []
    for r in ok:
        if r["family"] != "ours" or r["beams"] != 1 or "1" not in r.get("decode_steps", {}):
            continue
        st = r["decode_steps"]["1"]
        gbs = bw.get(str(r["threads"]))
        if not gbs:
            continue
        from pipeline.engine.modeldir import load_model_info

        model = load_model_info(r["model_dir"]) if r.get("model_dir") else info
        # mean context over the timed steps: the prompt + half of the M generated columns
        b = step_bytes(model, st["mean_prompt_tokens"] + report["max_new_tokens"] / 2)
        bound_ms = b["bytes"] / (gbs * 1e9) * 1000
        bound.append({"system": r["system"], "threads": r["threads"], **b, "bandwidth_gb_per_s": gbs,
                      "bound_ms": round(bound_ms, 2), "measured_ms": st["ms_per_step"],
                      "fraction_of_bound": round(bound_ms / st["ms_per_step"], 3), "target": 0.7,
                      "met": bound_ms / st["ms_per_step"] >= 0.7})
    report["target_bandwidth_bound"] = bound
    # The same bound for every system's batch-1 step, where its bytes per step are known: the fp32
    # ones read the same weights as ours fp32; llama.cpp Q4_1 reads its GGUF's tensor bytes.
    # CTranslate2 int8 quantises at load time (bytes not known from a file): left out.
    fp32_weights = step_bytes(info, 0)["weights_bytes"]
    q4_weights = _gguf_tensor_bytes(report["files"]["gguf_q4_1"]) if report.get("files") else None
    every = []
    for r in ok:
        st = r.get("decode_steps", {}).get("1")
        gbs = bw.get(str(r["threads"]))
        if st is None or not gbs or r["family"] == "ours":
            continue
        weights = fp32_weights if r["precision"] == "fp32" else q4_weights if r["precision"] == "q4_1" else None
        if weights is None:
            continue
        ctx = st["mean_prompt_tokens"] + report["max_new_tokens"] / 2
        kv = info.num_hidden_layers * 2 * info.num_key_value_heads * info.head_dim * 4 * ctx
        bound_ms = (weights + kv) / (gbs * 1e9) * 1000
        every.append({"system": r["system"], "threads": r["threads"], "bytes": int(weights + kv), "bound_ms":
                      round(bound_ms, 2), "measured_ms": st["ms_per_step"],
                      "fraction_of_bound": round(bound_ms / st["ms_per_step"], 3)})
    report["bandwidth_bound_peers"] = every


def _gguf_tensor_bytes(path: str) -> int:
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(path).tensors))


def render(report: dict) -> str:
    L = [f"SmolLM2-135M-Instruct, {report['prompts']} prompts (PaddleNLP: first {report['baseline_prompts']}), "
         f"max {report['max_new_tokens']} new tokens; CPU {report['cpu']['model']} ({report['cpu']['cores']} cores); "
         f"load {report['load_start'][0]} at start, {report['load_end'][0]} at end; {report['date']}", "",
         "| system | precision | threads | decoding | best batch (rows) | generated tokens | seconds | tokens/s | "
         "decode ms/step batch 1 | decode ms/step best batch | peak RSS MB | ROUGE-L | identical to ours fp32 (same decoding) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        dec = "greedy" if r["beams"] == 1 else f"beam {r['beams']}"
        head = f"| {r['system']} | {r['precision']} | {r['threads']} | {dec} |"
        if "not_offered" in r:
            L.append(f"{head} - | - | - | not offered: {r['not_offered']} | - | - | - | - | - |")
            continue
        if "error" in r:
            L.append(f"{head} - | - | - | FAILED: {r['error'][:120]} | - | - | {r.get('peak_rss_mb', '-')} | - | - |")
            continue
        steps = r.get("decode_steps", {})
        s1 = steps.get("1", {}).get("ms_per_step")
        best = r.get("best_step_batch")
        sb = steps.get(str(best), {}).get("ms_per_step") if best else None
        rows_per_batch = r["sample_batch_prompts"] * r["beams"]
        agree = r.get("identical_to_ours_fp32")
        s1_txt = "-" if s1 is None else f"{s1:.1f}"
        sb_txt = "-" if sb is None else f"{sb:.1f} (batch {best})"
        rouge_txt = "-" if r.get("rouge_l") is None else f"{r['rouge_l']:.3f}"
        agree_txt = "-" if not agree else f"{agree['identical']}/{agree['rows']}"
        L.append(f"{head} {rows_per_batch} | {r['generated_tokens']} | {r['seconds']:.1f} | {r['tokens_per_second']:.1f} |"
                 f" {s1_txt} | {sb_txt} | {r['peak_rss_mb']:.0f} | {rouge_txt} | {agree_txt} |")
    for label, key in (("at the start", "bandwidth"), ("at the end", "bandwidth_end")):
        bw = report.get(key)
        if bw:
            L.append(("" if key == "bandwidth_end" else "\n") + f"read bandwidth {label} (1 GiB streaming read, best of "
                     f"{bw['passes']}): " + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in bw["gb_per_s"].items())
                     + f"; numpy sum, 1 thread: {bw['numpy_sum_1_thread_gb_per_s']:.1f} GB/s")
    used = report.get("bandwidth_used_for_bound_gb_per_s", {})
    if used:
        L.append("bandwidth used for the bound (the highest measured with at most that many threads): "
                 + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in used.items()))
    for t in report["target_sample_vs_fastest_fp32_peer"]:
        L.append(f"target, whole sample >= 1.3x the fastest fp32 peer ({t['threads']} thr, "
                 f"{'greedy' if t['beams'] == 1 else 'beam ' + str(t['beams'])}): ours {t['ours_tokens_per_second']:.1f} "
                 f"vs {t['fastest_fp32_peer']} {t['peer_tokens_per_second']:.1f} = {t['ratio']:.2f}x: "
                 f"{'met' if t['met'] else 'NOT met'}")
    for b in report["target_bandwidth_bound"]:
        L.append(f"target, batch-1 decode within 70% of the bandwidth bound ({b['system']}, {b['threads']} thr): "
                 f"{b['bytes'] / 1e6:.0f} MB per step / {b['bandwidth_gb_per_s']:.1f} GB/s = {b['bound_ms']:.1f} ms "
                 f"bound; measured {b['measured_ms']:.1f} ms = {100 * b['fraction_of_bound']:.0f}% of the bound: "
                 f"{'met' if b['met'] else 'NOT met'}")
    for b in report.get("bandwidth_bound_peers", []):
        L.append(f"bound, for comparison ({b['system']}, {b['threads']} thr): {b['bytes'] / 1e6:.0f} MB per step, "
                 f"{b['bound_ms']:.1f} ms bound; measured {b['measured_ms']:.1f} ms = "
                 f"{100 * b['fraction_of_bound']:.0f}% of the bound")
    return "\n".join(L)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if "tokens_per_second" in r]
    colors = {"ours": "#1565c0", "peer": "#ef6c00", "baseline": "#9e9e9e"}
    panels = [(t, b) for t in report["threads"] for b in report["beams"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 0.42 * 9 + 2), sharey=True, squeeze=False)
    names = list(dict.fromkeys(r["system"] for r in report["runs"]))
    for ax, (t, b) in zip(axes[0], panels):
        by = {r["system"]: r for r in runs if r["threads"] == t and r["beams"] == b}
        vals = [by[n]["tokens_per_second"] if n in by else 0 for n in names]
        bars = ax.barh(names, vals, color=[colors[by[n]["family"]] if n in by else "#fff" for n in names])
        for bar, n, v in zip(bars, names, vals):
            ax.text(v, bar.get_y() + bar.get_height() / 2, f" {v:.0f}" if n in by else " n/a", va="center",
                    fontsize=8)
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}, {'greedy' if b == 1 else f'beam {b}'}", fontsize=10)
        ax.set_xlabel("generated tokens/s, whole sample")
        ax.margins(x=0.2)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"SmolLM2-135M generation, {report['prompts']} prompts x max {report['max_new_tokens']} new tokens "
                 f"(PaddleNLP: {report['baseline_prompts']}); {report['cpu']['model']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
