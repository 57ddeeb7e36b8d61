"""Op types and counts of a runtime model's program: as exported, and as Paddle Inference runs it
after its IR passes (oneDNN fusions on the CPU).

    python scripts/show_program_ops.py [MODEL_DIR] [--threads 1] [--json out.json]

MODEL_DIR defaults to the converted default model. The optimised program is what
`config.enable_save_optim_model(True)` writes after the passes ran.
"""

from __future__ import annotations

import zlib  # noqa: F401 - before paddle (see pipeline/engine/predictor.py)

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def op_counts(program_file: Path) -> Counter:
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc.FromString(program_file.read_bytes())
    return Counter(op.type for block in desc.blocks for op in block.ops if op.type not in ("feed", "fetch"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import numpy as np

    from pipeline.engine.modeldir import load_model_info
    from pipeline.engine.predictor import PaddlePredictor, PredictorSettings

    if args.model is None:
        from pipeline.cli import default_model

        info = default_model()
    else:
        info = load_model_info(args.model)
    exported = op_counts(info.program_file)
    with tempfile.TemporaryDirectory() as d:
        p = PaddlePredictor(info, PredictorSettings(threads=args.threads, save_optimized_program_to=d))
        ids = np.ones((2, 8), np.int64)
        p.run(ids, np.zeros_like(ids), np.ones((2, 8), np.float32))
        optimised_file = next(Path(d).rglob("_optimized.pdmodel"))
        optimised = op_counts(optimised_file)
    names = sorted(set(exported) | set(optimised), key=lambda n: (-optimised.get(n, 0), -exported.get(n, 0), n))
    print(f"{info.name} ({info.num_hidden_layers} layers, hidden {info.hidden_size}, task {info.task})")
    print(f"{'op type':<32}{'exported':>10}{'optimised':>11}")
    for n in names:
        print(f"{n:<32}{exported.get(n, 0):>10}{optimised.get(n, 0):>11}")
    print(f"{'total':<32}{sum(exported.values()):>10}{sum(optimised.values()):>11}")
    if args.json:
        args.json.write_text(json.dumps({"model": info.name, "exported": exported, "optimised": optimised}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
