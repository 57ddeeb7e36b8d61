"""python scripts/bench_decode_overhead.py (prints a table and JSON; run on an idle machine).

Is SmolLM2's batch-1 decode step op dispatch or bandwidth? The same program (30 layers, the same
ops) with tiny tensors, against the real one, at batch 1, Paddle Inference + oneDNN."""
import zlib  # noqa: F401 - before paddle (see pipeline/engine/predictor.py)

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench_out" / "decode_overhead.json"

def time_steps(folder, threads, vocab, S=32, n=60):
    from pipeline.engine.decoder_predictor import DecoderPredictor
    pred = DecoderPredictor(folder, max_batch=1, max_len=S + n + 2, threads=threads)
    ids = np.random.default_rng(0).integers(0, vocab, (1, S)).astype(np.int64)
    pred.prefill(ids, np.arange(S, dtype=np.int64)[None], np.ones((1, S), np.float32))
    ts = []
    for i in range(n):
        t = time.perf_counter()
        pred.step(np.array([[3]], np.int64), np.array([[S + i]], np.int64), np.ones((1, S + i + 1), np.float32))
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts[10:])), 1000 * float(min(ts[10:]))

def main():
    import paddle
    from pipeline.convert.decoder import DecoderConfig, DecoderForCausalLM
    from pipeline.convert.decoder_export import write_decoder_programs
    from pipeline.config import cache_dir
    paddle.set_device("cpu")
    smol = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    arch = json.loads((smol / "model.json").read_text())["architecture"]
    tiny_cfg = DecoderConfig.from_dict({**arch, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 3,
                                        "num_key_value_heads": 3, "head_dim": 8, "vocab_size": 256})
    tmp = Path(tempfile.mkdtemp())
    m = DecoderForCausalLM(tiny_cfg); m.eval()
    write_decoder_programs(m, tmp)
    out = {}
    for threads in (1, 2):
        out[f"smol {threads}t"] = time_steps(smol, threads, 49152)
        out[f"tiny30 {threads}t"] = time_steps(tmp, threads, 256)
    for k, (med, mn) in out.items():
        print(f"{k:12s} median {med:6.2f} ms  min {mn:6.2f} ms")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"cpu": cpu, "ms_per_step_median_min": out}, indent=2) + "\n")
    print(f"cpu: {cpu}; wrote {OUT}")

main()
