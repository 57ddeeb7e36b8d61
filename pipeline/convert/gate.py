"""The quality gate of a derived model or precision (an int8 copy from `quantize`, bf16 from
`gate`): the same held-out rows scored by the fp32 reference and the candidate through the
engine, exactly as `run` scores them, and the ranking metrics compared (no paddle here; the
engine imports it). `GateResult.fp32` holds the reference's metrics, `.int8` the candidate's
(whatever its precision: `.candidate` names it; the field names predate bf16).

Rows are split by a hash of the qid into a calibration half and a held-out half (no query is in
both). The gate passes when NDCG@10 and PNR each lose at most `max_loss_rate`:
|m_ref - m_new| / m_ref.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.convert.errors import ConversionError
from pipeline.engine.engine import Engine, EngineSettings
from pipeline.engine.modeldir import ModelInfo
from pipeline.engine.text import TextEncoder, TokenizeRequest
from pipeline.engine.tokenizer import Encoded
from pipeline.io.reader import ColumnMap, DatasetReader
from pipeline.ranking import ranking_metrics

GATE_METRICS = ("ndcg_at_10", "pnr")
DEFAULT_MAX_LOSS_RATE = 0.01


@dataclass
class GateResult:
    fp32: dict
    int8: dict
    loss_rate: dict
    max_abs_score_diff: float
    max_loss_rate: float
    passed: bool
    rows: int
    queries: int
    sequences: int
    seconds: dict = field(default_factory=dict)
    candidate: str = "int8"  # the precision gated against fp32


@dataclass
class Rows:
    """Accepted rows of labelled files, in memory (the calibration data is small)."""

    qid: list[str]
    doc_id: list[str]
    label: np.ndarray
    query: list[str] | None
    doc: list[str] | None
    input_ids: list | None
    token_type_ids: list | None

    def take(self, idx: np.ndarray) -> "Rows":
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Rows(pick(self.qid), pick(self.doc_id), self.label[idx], pick(self.query), pick(self.doc),
                    pick(self.input_ids), pick(self.token_type_ids))

    def __len__(self) -> int:
        return len(self.qid)


def read_rows(files: Sequence[Path], columns: ColumnMap) -> Rows:
    reader = DatasetReader(files, columns)
    parts = [c for c, _ in reader.chunks() if c is not None and len(c)]
    if not parts:
        raise ConversionError(f"no usable rows in {[str(f) for f in files]}")
    cat = lambda name: None if getattr(parts[0], name) is None else [x for c in parts for x in getattr(c, name)]  # noqa: E731
    label = (np.concatenate([c.label for c in parts]) if parts[0].label is not None
             else np.full(sum(len(c) for c in parts), np.nan))
    return Rows(cat("qid"), cat("doc_id"), label.astype(np.float64), cat("query"), cat("doc"),
                cat("input_ids"), cat("token_type_ids"))


def held_out_mask(qid: Sequence[str]) -> np.ndarray:
    """True for rows of the held-out half: decided per query by sha1(qid), so it is the same on
    every machine and run, and a query's rows are never split between the halves."""
    return np.array([hashlib.sha1(q.encode("utf-8")).digest()[0] & 1 == 1 for q in qid], dtype=bool)


def encode_rows(text: TextEncoder, model: ModelInfo, rows: Rows, max_seq_len: int) -> Encoded:
    """The sequences the model sees for `rows`, as `run` builds them: one pair per row, each
    distinct text once (bi), or the pre-tokenized ids as shipped."""
    if rows.query is None:
        if model.output != "score":
            raise ConversionError("pre-tokenized calibration data fits cross models only; bi models need "
                                  "query and doc text columns")
        return text.run(TokenizeRequest("pretokenized", max_seq_len, rows.input_ids, rows.token_type_ids)).enc
    if model.output == "score":
        return text.pairs(rows.query, rows.doc, max_seq_len)
    return text.texts(list(dict.fromkeys(rows.query + rows.doc)), max_seq_len)


def score_rows(engine: Engine, rows: Rows) -> np.ndarray:
    if rows.query is None:
        out, _ = engine.run_encoded(encode_rows(engine.text, engine.model, rows, engine.settings.max_seq_len))
        return out.astype(np.float64)
    return engine.score_pairs(rows.query, rows.doc)


def loss_rate(fp32: float | None, int8: float | None) -> float | None:
    if fp32 is None or int8 is None:
        return None
    if fp32 == 0:
        return 0.0 if int8 == 0 else float("inf")
    return abs(fp32 - int8) / abs(fp32)


def evaluate_gate(fp32_info: ModelInfo, int8_info: ModelInfo, rows: Rows, max_loss_rate: float,
                  threads: int, candidate_precision: str = "fp32") -> GateResult:
    """Score `rows` with both models (one stream of `threads` threads each) and compare; the
    candidate (`int8_info`) runs at `candidate_precision` (bf16: the same directory as the
    reference, run with bf16 kernels)."""
    metrics, scores, seconds, sequences = {}, {}, {}, 0
    runs = (("fp32", fp32_info, "fp32"), ("int8", int8_info, candidate_precision))
    for name, info, precision in runs:
        with Engine(info, EngineSettings(max_seq_len=info.max_seq_len, threads=threads,
                                         precision=precision)) as engine:
            sequences = len(encode_rows(engine.text, info, rows, engine.settings.max_seq_len))
            t0 = time.perf_counter()
            scores[name] = score_rows(engine, rows)
            seconds[name] = round(time.perf_counter() - t0, 3)
        metrics[name] = ranking_metrics(np.array(rows.qid), np.array(rows.doc_id), rows.label,
                                        scores[name]).to_dict()
    if any(metrics["fp32"][m] is None for m in GATE_METRICS):
        raise ConversionError(
            f"the held-out calibration rows define no {' / '.join(GATE_METRICS)} (metrics {metrics['fp32']}): "
            f"the gate needs labelled queries with at least one relevant and one non-relevant doc; "
            f"give --calib files with a label column")
    rates = {m: loss_rate(metrics["fp32"][m], metrics["int8"][m]) for m in GATE_METRICS}
    passed = all(r is not None and r <= max_loss_rate for r in rates.values())
    return GateResult(
        fp32=metrics["fp32"], int8=metrics["int8"], loss_rate=rates,
        max_abs_score_diff=float(np.max(np.abs(scores["fp32"] - scores["int8"]))) if len(rows) else 0.0,
        max_loss_rate=max_loss_rate, passed=passed, rows=len(rows), queries=len(set(rows.qid)),
        sequences=sequences, seconds=seconds,
        candidate=candidate_precision if candidate_precision != "fp32" else int8_info.precision)


def format_gate(gate: GateResult) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    c = gate.candidate
    lines = [f"gate on {gate.rows} held-out rows ({gate.queries} queries, {gate.sequences} sequences):"]
    for m in GATE_METRICS:
        r = gate.loss_rate[m]
        lines.append(f"  {m:<11} fp32 {f(gate.fp32[m])}  {c} {f(gate.int8[m])}  loss rate "
                     f"{'n/a' if r is None else f'{100 * r:.2f}%'} (limit {100 * gate.max_loss_rate:.2f}%)")
    lines.append(f"  mrr_at_10   fp32 {f(gate.fp32['mrr_at_10'])}  {c} {f(gate.int8['mrr_at_10'])}")
    lines.append(f"  max |score fp32 - score {c}| = {gate.max_abs_score_diff:.4g}")
    lines.append(f"  {'PASSED' if gate.passed else 'FAILED'}")
    return "\n".join(lines)
