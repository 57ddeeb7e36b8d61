"""One-time model exports for the peer systems, outside every timed run (runs in .venv-bench).

    python scripts/bench/prepare.py --runtime-model DIR --models-dir bench_out/models [--what p2o st-onnx ...]

- p2o: our runtime model (inference.pdmodel + .pdiparams, Paddle 2.6 legacy program) -> ONNX with
  paddle2onnx's C++ converter. paddle2onnx 2.x needs paddle >= 3.0 (the main venv has 2.6.2) and
  both its Python front ends import paddle, so the converter entry point is called directly, here
  where no paddle is installed; its own ONNX optimiser runs (no polygraphy, which would try to
  pip-install sympy at run time).
- st-onnx / st-openvino: sentence-transformers exports all-MiniLM-L6-v2 (local folder) with
  optimum / optimum-intel and saves the result, so the timed runs load it instead of exporting.
- ort-int8 / ort-int8-pc: onnxruntime's dynamic quantisation (`quantize_dynamic`) of the p2o
  export: every MatMul with a weight becomes MatMulInteger with int8 weights (per tensor, or per
  output channel for -pc) and uint8 activations quantised per batch at run time
  (DynamicQuantizeLinear); the attention's activation-by-activation MatMuls stay fp32.
- ct2 / ct2-int8: CTranslate2's `TransformersConverter` on the local all-MiniLM-L6-v2 folder,
  weights stored as float32 or int8.

Each export is redone only when its source changes (a stamp file records the source checksum).
Prints a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_source, versions  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

OPSET = 14


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def fresh(stamp: Path, key: str) -> bool:
    return stamp.exists() and stamp.read_text() == key


def export_p2o(runtime_model: Path, dst: Path) -> dict:
    program, params = runtime_model / "inference.pdmodel", runtime_model / "inference.pdiparams"
    key = json.dumps({"params": file_sha(params), "program": file_sha(program), "opset": OPSET})
    onnx_file = dst / "model.onnx"
    if fresh(dst / "stamp", key) and onnx_file.exists():
        return {"path": str(onnx_file), "reused": True}
    spec = importlib.util.find_spec("paddle2onnx")
    if spec is None:
        raise RuntimeError("paddle2onnx is not installed in .venv-bench (pip install -r requirements-bench.txt)")
    # Load the C++ converter without paddle2onnx/__init__.py (which imports paddle).
    pkg = types.ModuleType("paddle2onnx")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["paddle2onnx"] = pkg
    from paddle2onnx import paddle2onnx_cpp2py_export as c_p2o

    t0 = time.perf_counter()
    # export(model, params, opset, auto_upgrade_opset, verbose, onnx_checker, experimental_op,
    #        optimize, custom_ops, deploy_backend, calibration_file, external_file, export_fp16)
    blob = c_p2o.export(str(program), str(params), OPSET, True, False, True, True, True, {}, "onnxruntime",
                        "", "", False)
    dst.mkdir(parents=True, exist_ok=True)
    onnx_file.write_bytes(blob)
    seconds = time.perf_counter() - t0
    import numpy as np
    import onnxruntime as ort

    # Sanity: the export runs and gives unit-length embeddings.
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    ids = np.array([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]], dtype=np.int64)
    mask = (ids != 0).astype(np.float32)
    out = sess.run(None, dict(zip([i.name for i in sess.get_inputs()], (ids, np.zeros_like(ids), mask))))[0]
    norms = np.linalg.norm(out, axis=1)
    assert out.shape == (2, 384) and np.allclose(norms, 1, atol=1e-4), (out.shape, norms)
    (dst / "stamp").write_text(key)
    return {"path": str(onnx_file), "reused": False, "seconds": seconds, "bytes": len(blob), "opset": OPSET,
            "converter": "paddle2onnx C++ core (paddle2onnx_cpp2py_export.export), its optimiser on"}


def export_st(backend: str, dst: Path) -> dict:
    src = model_source()
    key = json.dumps({"weights": file_sha(src / "model.safetensors"), "backend": backend,
                      "versions": versions(["sentence-transformers", "optimum", "optimum-onnx", "optimum-intel",
                                            "transformers", "torch", "onnx", "openvino"])})
    if fresh(dst / "stamp", key):
        return {"path": str(dst), "reused": True}
    from sentence_transformers import SentenceTransformer

    if dst.exists():
        shutil.rmtree(dst)
    t0 = time.perf_counter()
    model = SentenceTransformer(str(src), device="cpu", backend=backend, local_files_only=True)
    model.save_pretrained(str(dst))
    seconds = time.perf_counter() - t0
    (dst / "stamp").write_text(key)
    return {"path": str(dst), "reused": False, "seconds": seconds}


QUANT_ORT = {"ort-int8": False, "ort-int8-pc": True}  # system -> per_channel
CT2 = {"ct2": "float32", "ct2-int8": "int8"}  # system -> the converter's quantization


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def constants_to_initializers(src: Path, dst: Path) -> int:
    """The same graph with its Constant nodes (paddle2onnx 1.x writes every weight as one) turned
    into initializers, which is what onnxruntime's quantizer looks for: it quantises a MatMul's B
    only when B is an initializer. Returns how many were moved."""
    import onnx

    m = onnx.load(str(src))
    keep, moved = [], 0
    for node in m.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and list(attrs) == ["value"]:
            t = onnx.TensorProto()
            t.CopyFrom(attrs["value"].t)
            t.name = node.output[0]
            m.graph.initializer.append(t)
            moved += 1
        else:
            keep.append(node)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return moved


def quantize_ort(src: Path, dst: Path, per_channel: bool) -> dict:
    """onnxruntime dynamic int8 of the fp32 ONNX model `src`: every MatMul with a weight
    (quantize_dynamic's default MatMulConstBOnly: the QKV, attention output and the two FFN
    MatMuls of each layer; the two activation-by-activation MatMuls of each attention stay fp32)
    becomes MatMulInteger with int8 weights (symmetric, per tensor or per output channel) and
    uint8 activations quantised per batch at run time (DynamicQuantizeLinear)."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    key = json.dumps({"src": file_sha(src), "per_channel": per_channel, "onnxruntime": onnxruntime.__version__,
                      "recipe": 2})
    onnx_file = dst / "model.onnx"
    settings = {"op_types_to_quantize": ["MatMul"], "MatMulConstBOnly": True, "per_channel": per_channel,
                "reduce_range": False, "weight_type": "QInt8", "activations": "QUInt8, DynamicQuantizeLinear per batch",
                "pre_processing": "Constant nodes -> initializers (nothing else)"}
    if fresh(dst / "stamp", key) and onnx_file.exists():
        return {"path": str(onnx_file), "reused": True, "settings": settings, "ops": op_counts(onnx_file)}
    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fp32 = dst / "fp32-initializers.onnx"
    moved = constants_to_initializers(src, fp32)
    quantize_dynamic(str(fp32), str(onnx_file), op_types_to_quantize=["MatMul"], per_channel=per_channel,
                     reduce_range=False, weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    seconds = time.perf_counter() - t0
    fp32.unlink()
    before, after = op_counts(src), op_counts(onnx_file)
    quantized = after.get("MatMulInteger", 0)
    assert quantized > 0 and quantized + after.get("MatMul", 0) == before["MatMul"], (before, after)
    (dst / "stamp").write_text(key)
    return {"path": str(onnx_file), "reused": False, "seconds": seconds, "bytes": onnx_file.stat().st_size,
            "settings": settings, "constants_moved": moved, "matmuls": before["MatMul"],
            "matmuls_quantized": quantized, "matmuls_left_fp32": after.get("MatMul", 0), "ops": after,
            "quantizer": f"onnxruntime.quantization.quantize_dynamic (onnxruntime {onnxruntime.__version__})"}


def convert_ct2(dst: Path, quantization: str) -> dict:
    """CTranslate2 model of the local all-MiniLM-L6-v2 folder (its BertModel loader: an encoder
    whose last hidden state the worker mean-pools)."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    src = model_source()
    key = json.dumps({"weights": file_sha(src / "model.safetensors"), "quantization": quantization,
                      "versions": versions(["ctranslate2", "transformers", "torch"])})
    if fresh(dst / "stamp", key) and (dst / "model.bin").exists():
        return {"path": str(dst), "reused": True, "quantization": quantization}
    if dst.exists():
        shutil.rmtree(dst)
    t0 = time.perf_counter()
    TransformersConverter(str(src)).convert(str(dst), quantization=quantization, force=True)
    seconds = time.perf_counter() - t0
    (dst / "stamp").write_text(key)
    return {"path": str(dst), "reused": False, "seconds": seconds, "quantization": quantization,
            "bytes": (dst / "model.bin").stat().st_size,
            "converter": f"ctranslate2.converters.TransformersConverter (ctranslate2 {ctranslate2.__version__})"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime-model", type=Path, required=True)
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--what", nargs="+", default=["p2o", "st-onnx", "st-openvino", "ort-int8", "ort-int8-pc", "ct2",
                                                  "ct2-int8"])
    args = ap.parse_args()
    out: dict = {}
    for what in args.what:
        try:
            if what == "p2o":
                out[what] = export_p2o(args.runtime_model, args.models_dir / "p2o")
            elif what in QUANT_ORT:
                if "error" in out.get("p2o", {}):
                    raise RuntimeError(f"needs the p2o export, which failed: {out['p2o']['error']}")
                src = args.models_dir / "p2o" / "model.onnx"
                if not src.exists():
                    out["p2o"] = export_p2o(args.runtime_model, args.models_dir / "p2o")
                out[what] = quantize_ort(src, args.models_dir / what, QUANT_ORT[what])
            elif what in CT2:
                out[what] = convert_ct2(args.models_dir / what, CT2[what])
            else:
                out[what] = export_st(what[3:], args.models_dir / what)
        except Exception as e:  # noqa: BLE001 - the parent skips the system and reports why
            import traceback

            traceback.print_exc()
            out[what] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
