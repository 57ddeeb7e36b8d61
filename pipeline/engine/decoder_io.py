"""The decoder runtime directory's programs and their named inputs and outputs: written by
`convert/decoder_export.py`, read by `engine/decoder_predictor.py` (the runtime owns the names;
the converter follows them)."""

from __future__ import annotations

from pathlib import Path

PREFILL_PROGRAM = "prefill.pdmodel"
DECODE_PROGRAM = "decode.pdmodel"
PARAMS_FILE = "decoder.pdiparams"

INPUT_IDS, POSITION_IDS, ATTENTION_MASK, LOGITS = "input_ids", "position_ids", "attention_mask", "logits"


def past_names(num_layers: int) -> list[str]:
    """past_key_0, past_value_0, past_key_1, ... (decode inputs after the three token inputs)."""
    return [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """present_key_0, present_value_0, ... (prefill outputs after logits)."""
    return [f"present_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def new_names(num_layers: int) -> list[str]:
    """new_key_0, new_value_0, ... (decode outputs after logits)."""
    return [f"new_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def prefill_io(num_layers: int) -> tuple[list[str], list[str]]:
    return [INPUT_IDS, POSITION_IDS, ATTENTION_MASK], [LOGITS, *present_names(num_layers)]


def decode_io(num_layers: int) -> tuple[list[str], list[str]]:
    return [INPUT_IDS, POSITION_IDS, ATTENTION_MASK, *past_names(num_layers)], [LOGITS, *new_names(num_layers)]


def program_io_shapes(program_file: Path) -> dict[str, list[int]]:
    """Every feed and fetch variable of a saved program with its declared dims (-1: dynamic)."""
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc.FromString(Path(program_file).read_bytes())
    block = desc.blocks[0]
    dims = {v.name: list(v.type.lod_tensor.tensor.dims) for v in block.vars}
    names = []
    for op in block.ops:
        if op.type == "feed":
            names += next(o for o in op.outputs if o.parameter == "Out").arguments
        elif op.type == "fetch":
            names += next(i for i in op.inputs if i.parameter == "X").arguments
    return {n: dims[n] for n in names}
