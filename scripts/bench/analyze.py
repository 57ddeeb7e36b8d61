"""Quality figures of every run of the peer benchmark (runs in the main venv, which has the
pipeline's ranking metrics).

    python scripts/bench/analyze.py REQUEST.json   (prints a JSON answer on stdout)

REQUEST: {"data": pairs.tsv, "reference": scores file of our fp32 pipeline,
          "runs": {key: {"scores": file, "pairs": n}}}
For each run: NDCG@10, MRR@10, PNR on its pairs (the first n of the file), the max abs score
difference against the reference on the same pairs, and NaN counts. For runs on fewer pairs than
the file holds, also the reference's own metrics on that prefix (the fair comparison).
And each run's gate, the one our int8 converter applies (pipeline.convert.gate): NDCG@10 and PNR
of the run against the reference's on the same pairs, loss rate |m_ref - m| / m_ref each, pass
when both are <= 1%.
"""

from __future__ import annotations

import zlib  # noqa: F401 - before anything that may import paddle

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import read_pairs, read_scores  # noqa: E402
from pipeline.convert.gate import DEFAULT_MAX_LOSS_RATE, GATE_METRICS, loss_rate  # noqa: E402
from pipeline.ranking import ranking_metrics  # noqa: E402


def metrics(data: dict, n: int, score: np.ndarray) -> dict:
    m = ranking_metrics(np.array(data["qid"][:n], dtype=object), np.array(data["doc_id"][:n], dtype=object),
                        np.array(data["label"][:n], dtype=np.float64), score).to_dict()
    return {k: m.get(k) for k in ("ndcg_at_10", "mrr_at_10", "pnr", "queries", "pairs_correct", "pairs_wrong",
                                  "pairs_tied") if k in m}


def gate(ref: dict, got: dict, max_loss_rate: float = DEFAULT_MAX_LOSS_RATE) -> dict:
    loss = {k: loss_rate(ref.get(k), got.get(k)) for k in GATE_METRICS}
    return {"reference": {k: ref.get(k) for k in GATE_METRICS}, "candidate": {k: got.get(k) for k in GATE_METRICS},
            "loss_rate": loss, "max_loss_rate": max_loss_rate,
            "passed": all(v is not None and v <= max_loss_rate for v in loss.values())}


def main() -> int:
    req = json.loads(Path(sys.argv[1]).read_text())
    data = read_pairs(Path(req["data"]))
    total = len(data["qid"])
    ref = np.array(read_scores(Path(req["reference"]))) if req.get("reference") else None
    out = {}
    ref_prefix: dict[int, dict] = {}
    for key, run in req["runs"].items():
        s = np.array(read_scores(Path(run["scores"])), dtype=np.float64)
        n = len(s)
        r = {"pairs": n, "nan": int(np.isnan(s).sum())}
        if n > total:
            r["error"] = f"{n} scores for {total} pairs"
            out[key] = r
            continue
        r["metrics"] = metrics(data, n, s)
        if ref is not None and len(ref) >= n:
            r["max_abs_diff_vs_reference"] = float(np.nanmax(np.abs(s - ref[:n]))) if n else 0.0
            if n not in ref_prefix:
                ref_prefix[n] = metrics(data, n, ref[:n])
            if n < total:
                r["reference_metrics_same_pairs"] = ref_prefix[n]
            r["gate"] = gate(ref_prefix[n], r["metrics"])
        out[key] = r
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
