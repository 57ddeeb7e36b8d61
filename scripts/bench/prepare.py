"""One-time model exports for the peer systems, outside every timed run (runs in .venv-bench).

    python scripts/bench/prepare.py --runtime-model DIR --models-dir bench_out/models [--what p2o st-onnx st-openvino]

- p2o: our runtime model (inference.pdmodel + .pdiparams, Paddle 2.6 legacy program) -> ONNX with
  paddle2onnx's C++ converter. paddle2onnx 2.x needs paddle >= 3.0 (the main venv has 2.6.2) and
  both its Python front ends import paddle, so the converter entry point is called directly, here
  where no paddle is installed; its own ONNX optimiser runs (no polygraphy, which would try to
  pip-install sympy at run time).
- st-onnx / st-openvino: sentence-transformers exports all-MiniLM-L6-v2 (local folder) with
  optimum / optimum-intel and saves the result, so the timed runs load it instead of exporting.

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime-model", type=Path, required=True)
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--what", nargs="+", default=["p2o", "st-onnx", "st-openvino"])
    args = ap.parse_args()
    out: dict = {}
    for what in args.what:
        try:
            if what == "p2o":
                out[what] = export_p2o(args.runtime_model, args.models_dir / "p2o")
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
