"""One benchmark system, one process: load the model, then score every pair of a pairs file.

    python scripts/bench/worker.py SYSTEM --data PAIRS.tsv --out DIR --threads T

Writes DIR/scores.txt (one bi-encoder cosine per pair, input order) and DIR/result.json
(load seconds, end-to-end scoring seconds and their stages, texts and tokens encoded, versions).
The timed part starts after the model is loaded and covers reading the pairs file, tokenizing,
the forward passes and the cosines, as the pipeline's own `seconds.total - seconds.startup` does.

Systems (the parent runs each with the right interpreter):
- baseline       main venv: PaddleNLP BertModel in dynamic-graph mode, PaddleNLP's Python
                 BertTokenizer, batches of 32 in input order padded to 256, query and doc of every
                 pair encoded (no dedupe), fp32, default environment (no MKL_DEBUG_CPU_TYPE).
- st-torch, st-onnx, st-openvino
                 .venv-bench: sentence-transformers `encode` (its own length-sorted batches of 32,
                 padded per batch) on the distinct texts of the file, with the given backend.
- ort-p2o        .venv-bench: onnxruntime on our runtime model exported by paddle2onnx, as the
                 backend of the pipeline's own `Engine` (its tokenizer, length-sorted token-budget
                 batches and padding) on the distinct texts (tokenized in this process).
- ort-int8, ort-int8-pc
                 .venv-bench: as ort-p2o (same tokenizer, batches and session settings) on the
                 dynamic-int8 copy of the same export (prepare.py: quantize_dynamic, every MatMul,
                 weights per tensor / per channel).
- ct2, ct2-int8  .venv-bench: CTranslate2 `Encoder.forward_batch` (float32 / int8 model from its
                 TransformersConverter) as the backend of the pipeline's `Engine` (same tokenizer and
                 batches as ort-p2o), mean pooling over the attention mask and L2 norm in numpy.
- engine-paddle, engine-ort
                 diagnosis only (bench_peers.py --diagnose): the Paddle predictor (main venv) or
                 onnxruntime on the paddle2onnx export (.venv-bench) as the backend of the
                 pipeline's `Engine`, alone on the pipeline's batches, two passes (the first pays
                 each new batch shape's set-up, the second does not).
"""

from __future__ import annotations

import zlib  # noqa: F401 - before paddle (paddle 2.6 breaks zlib otherwise)

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MAX_SEQ_LEN, ROOT, Clock, dump, model_source, read_pairs, versions, write_scores,
)

T_PROCESS = time.perf_counter()  # as early as this module allows: imports above are stdlib only

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "AISTUDIO_HUB_OFFLINE",
           "AISTUDIO_BOS_OFFLINE"):
    os.environ[_k] = "1"  # nothing may try a download


def distinct(data: dict[str, list[str]]):
    """Distinct texts in first-seen order and each pair's query and doc index into them."""
    slot: dict[str, int] = {}
    qi = [slot.setdefault(t, len(slot)) for t in data["query"]]
    di = [slot.setdefault(t, len(slot)) for t in data["doc"]]
    return list(slot), qi, di


def cosines(emb, qi, di):
    """Cosine of L2-normalised embeddings (float64 dot products)."""
    import numpy as np

    e = np.asarray(emb, dtype=np.float64)
    return np.einsum("ij,ij->i", e[np.asarray(qi)], e[np.asarray(di)])


# ----------------------------------------------------------------------------- 1. the plain baseline


def run_baseline(args, clock: Clock) -> dict:
    import numpy as np
    import paddle
    from paddlenlp.transformers import BertConfig, BertModel, BertTokenizer
    from safetensors.numpy import load_file

    import json

    src = model_source()
    cfg = json.loads((src / "config.json").read_text())
    paddle.set_device("cpu")
    paddle.base.core.set_num_threads(args.threads)
    config = BertConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
                        intermediate_size=cfg["intermediate_size"], hidden_act=cfg["hidden_act"],
                        max_position_embeddings=cfg["max_position_embeddings"], type_vocab_size=cfg["type_vocab_size"],
                        layer_norm_eps=cfg["layer_norm_eps"], pad_token_id=cfg["pad_token_id"])
    model = BertModel(config)
    model.set_state_dict(hf_to_paddlenlp_bert(load_file(str(src / "model.safetensors")), cfg["num_hidden_layers"],
                                              model.state_dict()))
    model.eval()
    tok = BertTokenizer(vocab_file=str(src / "vocab.txt"), do_lower_case=True)
    load_done = time.perf_counter()

    batch, max_len = 32, MAX_SEQ_LEN
    t0 = time.perf_counter()
    with clock("read"):
        data = read_pairs(args.data)
    n = len(data["qid"])
    scores = np.empty(n, dtype=np.float64)
    real_tokens = 0

    def embed(texts):
        nonlocal real_tokens
        with clock("tokenize"):
            enc = tok(texts, max_length=max_len, padding="max_length", truncation=True, return_attention_mask=True)
            ids = np.asarray(enc["input_ids"], dtype=np.int64)
            types = np.asarray(enc["token_type_ids"], dtype=np.int64)
            mask = np.asarray(enc["attention_mask"], dtype=np.float32)
            real_tokens += int(mask.sum())
        with clock("infer"):
            with paddle.no_grad():
                m = paddle.to_tensor(mask)
                seq = model(paddle.to_tensor(ids), token_type_ids=paddle.to_tensor(types), attention_mask=m)[0]
                mean = (seq * m.unsqueeze(-1)).sum(axis=1) / m.sum(axis=1, keepdim=True)
                emb = paddle.nn.functional.normalize(mean, axis=-1)
            return emb.numpy()

    for start in range(0, n, batch):
        q = embed(data["query"][start:start + batch])
        d = embed(data["doc"][start:start + batch])
        scores[start:start + batch] = np.einsum("ij,ij->i", q.astype(np.float64), d.astype(np.float64))
    seconds = time.perf_counter() - t0
    return {"scores": scores, "load_done": load_done, "seconds": seconds, "texts_encoded": 2 * n,
            "real_tokens": real_tokens, "padded_tokens": 2 * n * max_len, "batches": 2 * -(-n // batch),
            "dedupe": False, "precision": "fp32",
            "settings": {"batch_size": batch, "padding": "max_length", "max_length": max_len,
                         "paddle_num_threads": args.threads, "MKL_DEBUG_CPU_TYPE": os.environ.get("MKL_DEBUG_CPU_TYPE")},
            "versions": versions(["paddlepaddle", "paddlenlp", "numpy"])}


def hf_to_paddlenlp_bert(w: dict, n_layers: int, like: dict) -> dict:
    """HF BERT tensor names -> PaddleNLP BertModel's; HF Linear weights are [out, in], Paddle's [in, out]."""
    w = {k[5:] if k.startswith("bert.") else k: v for k, v in w.items()}
    out = {}
    for e in ("word", "position", "token_type"):
        out[f"embeddings.{e}_embeddings.weight"] = w[f"embeddings.{e}_embeddings.weight"]
    out["embeddings.layer_norm.weight"] = w["embeddings.LayerNorm.weight"]
    out["embeddings.layer_norm.bias"] = w["embeddings.LayerNorm.bias"]
    lin = {"attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
           "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
           "intermediate.dense": "linear1", "output.dense": "linear2"}
    ln = {"attention.output.LayerNorm": "norm1", "output.LayerNorm": "norm2"}
    for i in range(n_layers):
        for a, b in lin.items():
            out[f"encoder.layers.{i}.{b}.weight"] = w[f"encoder.layer.{i}.{a}.weight"].T
            out[f"encoder.layers.{i}.{b}.bias"] = w[f"encoder.layer.{i}.{a}.bias"]
        for a, b in ln.items():
            out[f"encoder.layers.{i}.{b}.weight"] = w[f"encoder.layer.{i}.{a}.weight"]
            out[f"encoder.layers.{i}.{b}.bias"] = w[f"encoder.layer.{i}.{a}.bias"]
    if "pooler.dense.weight" in w:
        out["pooler.dense.weight"] = w["pooler.dense.weight"].T
        out["pooler.dense.bias"] = w["pooler.dense.bias"]
    missing = sorted(set(like) - set(out))
    assert not missing, f"weights missing for {missing[:5]}"
    for k, v in out.items():
        assert tuple(v.shape) == tuple(like[k].shape), f"{k}: {v.shape} vs {like[k].shape}"
    return {k: v.copy() for k, v in out.items()}


# ----------------------------------------------------------------------------- 3. sentence-transformers


def run_st(args, clock: Clock, backend: str) -> dict:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    kwargs: dict = {}
    if backend == "onnx":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        kwargs = {"session_options": so, "provider": "CPUExecutionProvider"}
    elif backend == "openvino":
        kwargs = {"ov_config": {"INFERENCE_NUM_THREADS": str(args.threads)}}
    path = args.model_dir or model_source()
    model = SentenceTransformer(str(path), device="cpu", backend=backend, model_kwargs=kwargs or None,
                                local_files_only=True)
    engine = engine_settings(model, backend)
    load_done = time.perf_counter()

    t0 = time.perf_counter()
    with clock("read"):
        data = read_pairs(args.data)
    texts, qi, di = distinct(data)
    with clock("encode"):  # tokenizing inside: sentence-transformers does both per batch
        emb = model.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
    with clock("cosine"):
        scores = cosines(emb, qi, di)
    seconds = time.perf_counter() - t0

    # Token counts, outside the timed part: what encode() fed the model. It sorts texts by
    # character length (longest first) and pads each batch of 32 to its longest.
    lengths = np.array([len(x) for x in model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]])
    order = np.argsort([-len(t) for t in texts], kind="stable")
    padded = sum(int(lengths[order[i:i + 32]].max()) * len(order[i:i + 32]) for i in range(0, len(order), 32))
    return {"scores": scores, "load_done": load_done, "seconds": seconds, "texts_encoded": len(texts),
            "real_tokens": int(lengths.sum()), "padded_tokens": padded, "batches": -(-len(texts) // 32),
            "dedupe": True, "precision": "fp32", "settings": {"batch_size": 32, "backend": backend,
                                                                "max_seq_length": model.max_seq_length,
                                                                "model_dir": str(path), **engine},
            "versions": versions(["sentence-transformers", "transformers", "torch", "onnxruntime", "openvino",
                                  "optimum", "optimum-onnx", "optimum-intel", "tokenizers", "numpy"])}


def engine_settings(model, backend: str) -> dict:
    """What the engine under sentence-transformers was really set to (threads, precision)."""
    import torch

    out: dict = {"torch_threads": torch.get_num_threads()}
    try:
        inner = model[0].auto_model
        if backend == "onnx":
            sess = inner.model if hasattr(inner, "model") else inner.session
            out["ort_providers"] = sess.get_providers()
            so = sess.get_session_options()
            out["ort_intra_op_threads"] = so.intra_op_num_threads
            out["ort_graph_optimization"] = str(so.graph_optimization_level)
        elif backend == "openvino":
            cm = inner.request  # optimum-intel keeps the CompiledModel here (not yet an InferRequest)
            for prop in ("INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS"):
                try:
                    out[f"ov_{prop}"] = str(cm.get_property(prop))
                except Exception as e:  # noqa: BLE001 - a property a version lacks is just not reported
                    out[f"ov_{prop}"] = f"n/a ({type(e).__name__})"
    except Exception as e:  # noqa: BLE001 - informative only
        out["engine_settings_error"] = f"{type(e).__name__}: {e}"
    return out


def batching_settings(args, info) -> dict:
    """The pipeline's batching settings: as its own run resolved them (passed by the parent from
    report.json), else resolved here from the pipeline's defaults."""
    import json

    if args.batching:
        return json.loads(args.batching)
    from pipeline.config import RunConfig, resolve

    s = resolve(RunConfig(), info)
    return {"max_batch_tokens": s.max_batch_tokens, "max_batch_size": s.max_batch_size, "pad_multiple": s.pad_multiple}


class TimedBackend:
    """A backend (`pipeline.engine.engine.Backend`) whose calls are timed: each call's seconds in
    `calls`, in call order (one stream, so that is the engine's batch order), and their sum in
    `clock[stage]` when a clock is given."""

    concurrency = 1

    def __init__(self, run, clock: Clock | None = None, stage: str = "infer"):
        self._run, self._clock, self._stage, self.calls = run, clock, stage, []

    def run(self, input_ids, token_type_ids, attention_mask):
        t0 = time.perf_counter()
        out = self._run(input_ids, token_type_ids, attention_mask)
        dt = time.perf_counter() - t0
        self.calls.append(dt)
        if self._clock is not None:
            self._clock.seconds[self._stage] = self._clock.seconds.get(self._stage, 0.0) + dt
        return out


def ort_runner(onnx: Path, threads: int, optimize: bool):
    """onnxruntime on the paddle2onnx export: a function of the three padded arrays."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(*arrays):
        return sess.run(None, dict(zip(names, arrays)))[0]

    return run


def pipeline_settings(info, bs: dict, threads: int):
    """`EngineSettings` of one stream of `threads` threads with the pipeline's batching settings."""
    from pipeline.engine.engine import EngineSettings

    return EngineSettings(max_seq_len=info.max_seq_len, max_batch_tokens=bs["max_batch_tokens"],
                          max_batch_size=bs["max_batch_size"], pad_multiple=bs["pad_multiple"],
                          threads=threads, streams=1)


def pipeline_engine(info, bs: dict, threads: int, backend):
    """Our engine (tokenizer, batch plan, padding, output order) on `backend`."""
    from pipeline.engine.engine import Engine

    return Engine(info, pipeline_settings(info, bs, threads), backend)


# ----------------------------------------------------------------------------- 4. onnxruntime on paddle2onnx


def _score_timed(engine, info, data_file, clock) -> dict:
    """The pairs of `data_file` scored through `engine` (each distinct text once, the pipeline's
    batches), timed by stage; the engine is closed afterwards."""
    t0 = time.perf_counter()
    with clock("read"):
        data = read_pairs(data_file)
    n = len(data["qid"])
    texts, idx = distinct(data["query"] + data["doc"])
    with clock("tokenize"):
        enc = engine.text.texts(texts, info.max_seq_len)
    t_run = time.perf_counter()
    emb, stats = engine.run_encoded(enc)
    clock.seconds["batch"] = time.perf_counter() - t_run - clock.seconds.get("infer", 0.0)
    with clock("cosine"):
        scores = cosine(emb.astype(np.float64), idx[:n], idx[n:])
    seconds = time.perf_counter() - t0
    engine.close()
    return {"scores": scores, "seconds": seconds, "texts_encoded": len(texts), "real_tokens": stats.tokens,
            "padded_tokens": stats.padded_tokens, "batches": stats.batches, "dedupe": True}


def run_ort(args, clock: Clock, precision: str = "fp32", quantization: dict | None = None) -> dict:
    """Our engine with onnxruntime as its backend: the pipeline's tokenizer, batch plan and
    padding (`Engine.run_encoded`), in this process. Stages: read, tokenize, infer (the
    onnxruntime calls), batch (planning, padding and placing outputs: the rest of run_encoded),
    cosine."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from pipeline.engine.engine import cosine, distinct
    from pipeline.engine.modeldir import load_model_info

    info = load_model_info(args.runtime_model)
    bs = batching_settings(args, info)
    engine = pipeline_engine(info, bs, args.threads, TimedBackend(ort_runner(args.onnx, args.threads, True), clock))
    load_done = time.perf_counter()

    timed = _score_timed(engine, info, args.data, clock)
    return {**timed, "load_done": load_done, "precision": precision,
            "settings": {**bs, "onnx": str(args.onnx), "intra_op_threads": args.threads,
                         "graph_optimization": "ORT_ENABLE_ALL",
                         "tokenizer": "pipeline TextEncoder, in-process; batches by pipeline Engine",
                         **({"quantization": quantization} if quantization else {})},
            "versions": versions(["onnxruntime", "tokenizers", "numpy"])}


ORT_INT8 = {"ort-int8": False, "ort-int8-pc": True}  # system -> per_channel (prepare.py made the model)


def run_ort_int8(args, clock: Clock) -> dict:
    per_channel = ORT_INT8[args.system]
    q = {"method": "onnxruntime.quantization.quantize_dynamic", "op_types_to_quantize": ["MatMul"],
         "weights": "int8, " + ("per output channel" if per_channel else "per tensor"),
         "activations": "uint8, quantised per batch at run time (DynamicQuantizeLinear)"}
    return run_ort(args, clock, "int8", q)


# ----------------------------------------------------------------------------- 5. CTranslate2


CT2 = {"ct2": ("float32", "fp32"), "ct2-int8": ("int8", "int8")}  # system -> (compute_type, precision)


def ct2_runner(model_dir: Path, threads: int, compute_type: str):
    """CTranslate2's encoder on one padded batch: last hidden state, mean-pooled over the
    attention mask, L2-normalised (all-MiniLM-L6-v2's sentence-transformers modules: Transformer,
    Pooling with pooling_mode_mean_tokens, Normalize)."""
    import ctranslate2
    import numpy as np

    enc = ctranslate2.Encoder(str(model_dir), device="cpu", compute_type=compute_type, inter_threads=1,
                              intra_threads=threads)

    def run(input_ids, token_type_ids, attention_mask):
        mask = np.asarray(attention_mask, dtype=np.float32)
        ids = ctranslate2.StorageView.from_array(np.ascontiguousarray(input_ids, dtype=np.int32))
        lengths = ctranslate2.StorageView.from_array(mask.sum(axis=1).astype(np.int32))
        out = enc.forward_batch(ids, lengths, np.asarray(token_type_ids).tolist())
        h = np.asarray(out.last_hidden_state)  # [B, T, H] float32 (the CPU StorageView's array interface)
        m = mask[:, : h.shape[1], None]
        mean = (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)

    return run, enc


def run_ct2(args, clock: Clock) -> dict:
    """Our engine with CTranslate2 as its backend, as run_ort: the pipeline's tokenizer, batch plan
    and padding in this process; stages read, tokenize, infer (encoder + pooling), batch, cosine."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from pipeline.engine.engine import cosine, distinct
    from pipeline.engine.modeldir import load_model_info

    compute_type, precision = CT2[args.system]
    info = load_model_info(args.runtime_model)
    bs = batching_settings(args, info)
    run, enc = ct2_runner(args.model_dir, args.threads, compute_type)
    engine = pipeline_engine(info, bs, args.threads, TimedBackend(run, clock))
    load_done = time.perf_counter()

    timed = _score_timed(engine, info, args.data, clock)
    return {**timed, "load_done": load_done, "precision": precision,
            "settings": {**bs, "model_dir": str(args.model_dir), "compute_type": compute_type,
                         "ct2_compute_type_loaded": getattr(enc, "compute_type", None), "intra_threads": args.threads,
                         "inter_threads": 1, "pooling": "mean over attention mask, L2 norm (numpy)",
                         "tokenizer": "pipeline TextEncoder, in-process; batches by pipeline Engine"},
            "versions": versions(["ctranslate2", "tokenizers", "numpy"])}


# ----------------------------------------------------------------------------- diagnosis: engines alone


def run_engine(args, clock: Clock, engine: str) -> dict:
    """The inference engine alone under our `Engine` on the pipeline's batches of the distinct
    texts (tokenized beforehand), two passes of `run_encoded`: the first includes whatever each
    new batch shape costs the engine the first time (oneDNN primitive creation, ...), the second
    shows the steady-state kernels. Pass seconds include padding; per-batch seconds are the
    backend call alone."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from pipeline.engine.engine import cosine, distinct
    from pipeline.engine.modeldir import load_model_info

    info = load_model_info(args.runtime_model)
    bs = batching_settings(args, info)
    if engine == "paddle":
        from pipeline.engine.engine import create_backend

        inner = create_backend(info, pipeline_settings(info, bs, args.threads)).run
    else:
        inner = ort_runner(args.onnx, args.threads, False)
    backend = TimedBackend(inner)
    eng = pipeline_engine(info, bs, args.threads, backend)
    load_done = time.perf_counter()
    data = read_pairs(args.data)
    n = len(data["qid"])
    texts, idx = distinct(data["query"] + data["doc"])
    enc = eng.text.texts(texts, info.max_seq_len)
    batches = eng.plan(enc)  # the plan run_encoded follows
    per_batch = [[len(b.rows), b.seq_len] for b in batches]
    passes = []
    for _ in range(2):
        backend.calls.clear()
        emb, stats = eng.run_encoded(enc)
        passes.append(stats.seconds)
        assert len(backend.calls) == len(per_batch)
        for row, dt in zip(per_batch, backend.calls):
            row.append(dt)
    eng.close()
    scores = cosine(emb.astype(np.float64), idx[:n], idx[n:])
    return {"scores": scores, "load_done": load_done, "seconds": passes[1], "texts_encoded": len(texts),
            "real_tokens": stats.tokens, "padded_tokens": stats.padded_tokens, "batches": stats.batches,
            "dedupe": True, "precision": "fp32", "engine": engine, "pass_seconds": passes,
            "padded_tokens_per_second_warm": stats.padded_tokens / passes[1],
            "distinct_shapes": len({(r[0], r[1]) for r in per_batch}),
            "per_batch": per_batch,  # [rows, seq_len, first pass s, second pass s]
            "versions": versions(["paddlepaddle", "onnxruntime", "numpy"])}


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("system", choices=["baseline", "st-torch", "st-onnx", "st-openvino", "ort-p2o", "ort-int8",
                                       "ort-int8-pc", "ct2", "ct2-int8", "engine-paddle", "engine-ort"])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="st-*: the sentence-transformers folder; ct2*: the CTranslate2 model folder")
    ap.add_argument("--onnx", type=Path, default=None, help="ort-*: the ONNX model")
    ap.add_argument("--runtime-model", type=Path, default=None,
                    help="ort-*, ct2*: our runtime model directory (its tokenizer and batching)")
    ap.add_argument("--batching", default=None,
                    help="ort-*, ct2*, engine-*: JSON {max_batch_tokens, max_batch_size, pad_multiple} as the pipeline "
                         "resolved them (default: resolved from the pipeline's defaults)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    try:
        if args.system == "baseline":
            r = run_baseline(args, clock)
        elif args.system == "ort-p2o":
            r = run_ort(args, clock)
        elif args.system in ORT_INT8:
            r = run_ort_int8(args, clock)
        elif args.system in CT2:
            r = run_ct2(args, clock)
        elif args.system.startswith("engine-"):
            r = run_engine(args, clock, args.system[7:])
        else:
            r = run_st(args, clock, args.system[3:])
    except Exception as e:  # noqa: BLE001 - reported to the parent, which goes on with the others
        dump(args.out / "result.json", {"system": args.system, "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()})
        traceback.print_exc()
        return 1
    write_scores(args.out / "scores.txt", r.pop("scores"))
    load_done = r.pop("load_done")
    r.update(system=args.system, threads=args.threads, load_seconds=load_done - T_PROCESS,
             stage_seconds=clock.seconds, pid=os.getpid())
    dump(args.out / "result.json", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
