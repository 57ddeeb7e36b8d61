"""Building our Paddle module from mapped weights and exporting it as a runtime directory.

`save_runtime_dir` is the one staged-directory mechanism of every converter (convert, prune,
quantize write through `staged_dir`): export into a temporary folder, check, move into place.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.convert.errors import ConversionError
from pipeline.engine.modeldir import PROGRAM_FILE, VOCAB_FILE, ModelInfo, load_model_info, staged_dir, write_model_json

# ----------------------------------------------------------------------------- building and export


def build_model(config: dict, mode: str, weights: dict[str, np.ndarray]):
    """An ErnieScorer in eval mode carrying `weights` (only the ones its mode uses)."""
    import paddle

    from pipeline.convert.model import ErnieConfig, ErnieScorer

    model = ErnieScorer(ErnieConfig.from_dict(config), mode)
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(weights))
    if missing:
        raise ConversionError(f"mode {mode!r} needs tensors the checkpoint lacks: {missing[:5]}")
    model.set_state_dict({k: paddle.to_tensor(weights[k]) for k in wanted})
    model.eval()
    return model


def probe_batch(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A small padded batch with varied lengths, used to check an export against its source."""
    rng = np.random.default_rng(seed)
    lengths = np.array([7, 3, 12, 1])
    ids = np.zeros((4, 12), dtype=np.int64)
    types = np.zeros((4, 12), dtype=np.int64)
    mask = np.zeros((4, 12), dtype=np.float32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, vocab_size, n)
        types[i, n // 2:n] = 1
        mask[i, :n] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


# Bumped when the exported program changes in a way that makes older exports slower (not wrong):
# the cached default model is re-exported when its revision is older.
# 2: transpose2 ops carry their XShape output (see `add_transpose_xshape`).
PROGRAM_REVISION = 2


def model_inputs(model, batch: dict[str, np.ndarray]) -> list:
    """The dynamic-graph model's inputs for a padded numpy batch, position ids added when the
    model takes them (the `--target gpu` export)."""
    import paddle

    from pipeline.engine.batching import position_ids

    arrays = [batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")]
    if model.cfg.position_ids_input:
        arrays.append(position_ids(batch["attention_mask"]))
    return [paddle.to_tensor(a) for a in arrays]


def export_model(model, out_dir: Path) -> None:
    import paddle

    from pipeline.convert.model import input_specs

    static = paddle.jit.to_static(model, input_spec=input_specs(model.cfg.position_ids_input), full_graph=True)
    paddle.jit.save(static, str(out_dir / "inference"))
    add_transpose_xshape(out_dir / PROGRAM_FILE)


def add_transpose_xshape(program_file: Path) -> int:
    """Give every transpose2 op of a saved program the XShape output it lacks; returns how many.

    Paddle 2.6's dygraph-to-static export writes transpose2 without XShape, and oneDNN's
    matmul_transpose_reshape fuse pass only matches a transpose2 that has one, so the attention
    output's transpose + reshape (one pair per layer) stayed separate ops that copy the whole
    [B, S, H] activation. XShape is a shape-only output (no data is computed for it); with it the
    pass folds both into the preceding matmul (measured: 111 -> 99 ops on the default model,
    about 2% faster, identical outputs)."""
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc.FromString(program_file.read_bytes())
    added = 0
    for block in desc.blocks:
        var_of = {v.name: v for v in block.vars}
        for op in block.ops:
            if op.type != "transpose2" or any(o.parameter == "XShape" for o in op.outputs):
                continue
            x = next(i for i in op.inputs if i.parameter == "X").arguments[0]
            out = next(o for o in op.outputs if o.parameter == "Out").arguments[0]
            xshape = block.vars.add()
            xshape.CopyFrom(var_of[x])
            xshape.name, xshape.persistable = f"{out}.xshape", False
            dims = list(var_of[x].type.lod_tensor.tensor.dims)
            del xshape.type.lod_tensor.tensor.dims[:]
            xshape.type.lod_tensor.tensor.dims.extend([0] + dims)  # Paddle's XShape convention
            slot = op.outputs.add()
            slot.parameter = "XShape"
            slot.arguments.append(xshape.name)
            added += 1
    program_file.write_bytes(desc.SerializeToString())
    return added


def save_runtime_dir(model, meta: dict, vocab_file: Path, dst: Path, check: Callable[[ModelInfo], None],
                     extra_files: dict[str, bytes] | None = None) -> Path:
    """Export `model` with `vocab_file`, `extra_files` and `meta` (plus the params and vocab
    checksums) into a temporary directory beside `dst`, run `check` on it, and only then move it
    into place, replacing `dst` (callers refuse an existing `dst` without --force beforehand).
    A failed export or check leaves nothing behind, so a directory that exists is complete."""
    with staged_dir(dst) as stage:
        export_model(model, stage.path)
        shutil.copyfile(vocab_file, stage.path / VOCAB_FILE)
        for fname, data in (extra_files or {}).items():
            (stage.path / fname).write_bytes(data)
        write_model_json(stage.path, {**meta, "program_revision": PROGRAM_REVISION})
        check(load_model_info(stage.path))
    return dst


