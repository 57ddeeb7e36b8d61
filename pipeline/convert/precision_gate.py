"""`python -m pipeline gate MODEL_DIR --precision bf16 --data FILES`: the quality gate of a
runtime precision on a model directory, recorded in its model.json (no paddle here).

bf16 changes no file of the model: it is the same directory run with oneDNN's bf16 kernels. So
its gate scores labelled rows with the directory at fp32 and at bf16, exactly as `run` scores
them (`pipeline.convert.gate.evaluate_gate`), and compares NDCG@10 and PNR: each may lose at
most `max_loss_rate` (1%). bf16 needs no calibration, so every row of `data` is held out.

The record goes into model.json "gates"."bf16" (metrics, loss rates, rows, the CPU it was
measured on, `passed`, `forced`); `run --precision auto` then picks bf16 on a CPU with bf16
kernels. A failing gate is recorded too (auto will not pick it, and `--precision bf16` is
refused) unless `force`, which records it as accepted (`forced`: explicit `--precision bf16`
runs; auto still does not). The params file is not touched, so the model's checksum (and the
fingerprint of unfinished runs) stays the same; model.json is replaced atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from pipeline import __version__
from pipeline.convert.errors import ConversionError
from pipeline.convert.gate import DEFAULT_MAX_LOSS_RATE, GateResult, evaluate_gate, read_rows
from pipeline.engine.cpu import CpuFeatures
from pipeline.engine.modeldir import MODEL_JSON, ModelInfo, load_model_info
from pipeline.io.reader import ColumnMap, list_input_files

GATED_PRECISIONS = ("bf16",)  # int8 has its own copy of the model: `quantize` gates it


def gate_precision(model_dir: str | Path, data: Sequence[str | Path], precision: str = "bf16",
                   max_loss_rate: float = DEFAULT_MAX_LOSS_RATE, threads: int | None = None, force: bool = False,
                   columns: ColumnMap = ColumnMap(), cpu: CpuFeatures | None = None) -> GateResult:
    """Gate `precision` on the model in `model_dir` against its fp32 scores on `data`, and record
    the result in its model.json; returns the gate."""
    if precision not in GATED_PRECISIONS:
        raise ConversionError(f"gate --precision takes {', '.join(GATED_PRECISIONS)}; int8 is gated by `quantize`, "
                              f"which writes the int8 copy")
    info = load_model_info(model_dir)
    if not isinstance(info, ModelInfo) or info.precision != "fp32":
        raise ConversionError(f"{model_dir} is not an fp32 scoring model: bf16 is gated on the fp32 directory")
    cpu = _bf16_cpu(cpu)
    files = list_input_files(data)
    rows = read_rows(files, columns)
    gate = evaluate_gate(info, info, rows, max_loss_rate, threads or len(os.sched_getaffinity(0)),
                         candidate_precision=precision)
    record = {**asdict(gate), "passed": gate.passed, "forced": bool(force and not gate.passed),
              "data": [str(f) for f in files], "cpu": cpu.to_dict(), "pipeline_version": __version__}
    _record_gate(info.path, precision, record)
    return gate


def _bf16_cpu(cpu: CpuFeatures | None) -> CpuFeatures:
    """The CPU (detected unless given), refused when it has no bf16 kernels: a bf16 gate there
    would compare fp32 with fp32."""
    cpu = cpu or CpuFeatures.detect()
    if not cpu.bf16:
        raise ConversionError(f"this CPU ({cpu.model}, oneDNN ISA {cpu.isa}) has no bf16 kernels (AVX512_BF16 or "
                              f"AMX): Paddle would run fp32 and the gate would prove nothing; gate on a CPU that "
                              f"has them")
    return cpu


def _record_gate(folder: Path, precision: str, record: dict) -> None:
    path = folder / MODEL_JSON
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta.setdefault("gates", {})[precision] = record
    tmp = path.with_name(f".{MODEL_JSON}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def gate_decoder_precision(model_dir: str | Path, data: Sequence[str | Path], precision: str = "bf16",
                           max_loss_rate: float = DEFAULT_MAX_LOSS_RATE, threads: int | None = None,
                           force: bool = False, max_new_tokens: int = 64, cpu: CpuFeatures | None = None):
    """The bf16 gate of a decoder (generation) directory: greedy outputs on `data` at fp32
    (cached, convert/generation_gate.py) and at bf16, ROUGE-L and BLEU each within
    `max_loss_rate`; recorded in its model.json "gates"."bf16" (with the CPU), as for scoring."""
    from pipeline.convert.generation_gate import GateCandidate, GateDecoding, gate_record, run_generation_gate
    from pipeline.engine.decoder_modeldir import DecoderModelInfo

    if precision not in GATED_PRECISIONS:
        raise ConversionError(f"gate --precision takes {', '.join(GATED_PRECISIONS)}; a decoder's int8 is gated by "
                              f"`quantize`, which writes the int8 copy")
    info = load_model_info(model_dir)
    if not isinstance(info, DecoderModelInfo) or info.precision != "fp32":
        raise ConversionError(f"{model_dir} is not an fp32 decoder directory: bf16 is gated on the fp32 directory")
    cpu = _bf16_cpu(cpu)
    files = list_input_files(data)
    # A previous failing record would refuse the bf16 run the gate needs: the new one replaces it.
    _drop_gate(info.path, precision)
    decoding = GateDecoding(max_new_tokens=max_new_tokens)
    run = run_generation_gate(info.path, GateCandidate(info.path, precision), files, decoding, max_loss_rate,
                              threads=threads)
    record = gate_record(run.result, base_dir=info.path, data=files, decoding=decoding, forced=force,
                         extra={"cpu": cpu.to_dict(), "candidate_precision": precision,
                                "baseline_cached": run.baseline_cached})
    _record_gate(info.path, precision, record)
    return run.result


def _drop_gate(folder: Path, precision: str) -> None:
    path = folder / MODEL_JSON
    meta = json.loads(path.read_text(encoding="utf-8"))
    if precision in meta.get("gates", {}):
        del meta["gates"][precision]
        tmp = path.with_name(f".{MODEL_JSON}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
