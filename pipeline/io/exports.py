"""The ranking tasks' final files, built from the committed windows of a `RunStore` (no paddle).

- `predictions.tsv`: `qid \\t label \\t score` per scored pair, in input order (competition layout).
- `rejects.tsv`: `file, line, row, qid, doc_id, reason` per rejected row, in input order.
- `ranked.tsv`: `qid, doc_id, rank, score`, per qid by descending score (ties by doc_id).
- `queries.tsv`: `qid, ndcg_at_10` per evaluated query (exponential gain), in ranking order;
  only the header when the run has no metrics. With it, report.json's `queries` section: a
  fixed-bin histogram of those values and the `WORST_QUERIES` lowest ones with their top
  `WORST_TOP_DOCS` documents and labels (bounded, whatever the run's size; report.html shows it).
  Each listed document keeps its input `row`, so the caller can add the texts (read again from
  the inputs: `pipeline.io.row_texts`).
- `run.trec`: the same ranking as a TREC run file. Its fields are separated by spaces, so an id
  that holds whitespace or `%` is written percent-encoded there (`trec_id`: each such character
  becomes `%XX` per UTF-8 byte, as in a URL; `a b` -> `a%20b`, `50%` -> `50%25`); every other
  file holds ids as read. The rows so written are counted (`trec_escaped_rows` in report.json)
  and the CLI warns about them.

They are written into the store's `.partial/` folder; `RunStore.publish` moves them into OUT.

Memory stays flat in the number of rows. Pass 1 reads the parts one window at a time, writes
predictions.tsv, numbers the qids by first appearance and scatters each window's rows by bucket
(`QUERIES_PER_BUCKET` consecutive query numbers) into one scratch file per window, holding one
Arrow IPC stream per bucket at offsets kept in memory. Pass 2 reads each bucket's pieces back
(one file open at a time, whatever the number of buckets) and ranks it on its own. The state
that grows is the per-query numbering only: 16 bytes a query (64-bit hashes of the qids and their
numbers). A hash collision would merge two qids; pass 2 checks every bucket for that and, if it
ever happens, everything is redone with exact string keys.

`cancel.check()` runs between windows and between buckets: a cancelled finish raises
`pipeline.cancel.Cancelled` and leaves the committed windows as they were (resumable).
"""

from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.cancel import CancelToken
from pipeline.io.store import REJECT_COLUMNS, RunStore
from pipeline.memory import release_free_memory
from pipeline.ranking import RankingMetrics, combine_metrics, rank_per_query
from pipeline.ranking.metrics import ranking_metrics_per_query
from pipeline.ranking.judgements import Judgements

__all__ = ["QUERIES_PER_BUCKET", "RANKING_COLUMNS", "RankingOutputs", "format_label", "format_score", "trec_id",
           "write_ranking_outputs"]

QUERIES_PER_BUCKET = 4096
WORST_QUERIES = 20  # queries report.json lists with their top documents (lowest NDCG@10 first)
WORST_TOP_DOCS = 10
NDCG_BINS = 20  # equal bins over [0, 1] for report.json's per-query NDCG@10 histogram
SCORE_BINS = 40  # equal bins over [lowest, highest score] for report.json's score histogram
RANKING_COLUMNS = ("row", "qid", "doc_id", "label", "score")  # what the committed table must hold
SCRATCH = "buckets"
_BUCKET_SCHEMA = pa.schema([("code", pa.int64()), ("row", pa.int64()), ("qid", pa.string()),
                            ("doc_id", pa.string()), ("label", pa.float64()), ("score", pa.float64())])


def format_score(x: float) -> str:
    """Full precision: the shortest text that reads back as the same double."""
    return repr(float(x))


_TREC_UNSAFE = re.compile(r"[%\s]")  # \s: every Unicode whitespace, as str.split() splits on


def trec_id(value: str) -> str:
    """`value` as run.trec holds it: whitespace and `%` percent-encoded (UTF-8 bytes), the rest
    as is, so `urllib.parse.unquote(trec_id(v)) == v` for every id."""
    if not _TREC_UNSAFE.search(value):
        return value
    return _TREC_UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8")), value)


def _trec_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """trec_id of each id, and which ones it changed; one regex scan when none needs it."""
    if not _TREC_UNSAFE.search("".join(ids.tolist())):
        return ids, np.zeros(len(ids), dtype=bool)
    out = np.array([trec_id(v) for v in ids.tolist()], dtype=object)
    return out, out != ids


def format_label(x: float) -> str:
    if math.isnan(x):
        return ""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class _QidCollision(Exception):
    """Two different qids got the same 64-bit hash (and so the same number)."""


def _hash_keys(qids: list[str]) -> np.ndarray:
    return np.fromiter(map(hash, qids), dtype=np.int64, count=len(qids))


class _HashedFirstSeen:
    """Numbers qids 0, 1, ... in order of first appearance, keeping 16 bytes a qid: sorted runs
    of (hash, number) whose sizes halve from one run to the next (merged like a binary counter,
    so every key is merged O(log n) times)."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self.count = 0

    def codes(self, qids: list[str]) -> np.ndarray:
        keys, first, inverse = np.unique(_hash_keys(qids), return_index=True, return_inverse=True)
        code = np.full(len(keys), -1, dtype=np.int64)
        for run_keys, run_codes in self.runs:
            pos = np.minimum(np.searchsorted(run_keys, keys), len(run_keys) - 1)
            hit = run_keys[pos] == keys
            code[hit] = run_codes[pos[hit]]
        new = np.flatnonzero(code < 0)  # ascending, so keys[new] stays sorted
        code[new[np.argsort(first[new], kind="stable")]] = np.arange(self.count, self.count + len(new))
        self.count += len(new)
        if len(new):
            self._add_run(keys[new], code[new])
        return code[inverse.reshape(-1)]

    def _add_run(self, keys: np.ndarray, codes: np.ndarray) -> None:
        self.runs.append((keys, codes))
        while len(self.runs) > 1 and 2 * len(self.runs[-1][0]) >= len(self.runs[-2][0]):
            (k2, c2), (k1, c1) = self.runs.pop(), self.runs.pop()
            at = np.searchsorted(k1, k2) + np.arange(len(k2))  # where k2's keys land in the merge
            merged_k, merged_c = np.empty(len(k1) + len(k2), np.int64), np.empty(len(k1) + len(k2), np.int64)
            from_2 = np.zeros(len(merged_k), dtype=bool)
            from_2[at] = True
            merged_k[at], merged_c[at] = k2, c2
            merged_k[~from_2], merged_c[~from_2] = k1, c1
            self.runs.append((merged_k, merged_c))


class _ExactFirstSeen:
    """The same numbering with the qid strings as keys (the fallback after a hash collision)."""

    def __init__(self) -> None:
        self.code_of: dict[str, int] = {}

    def codes(self, qids: list[str]) -> np.ndarray:
        code_of = self.code_of
        return np.fromiter((code_of.setdefault(q, len(code_of)) for q in qids), np.int64, len(qids))


@dataclass
class RankingOutputs:
    """What writing the ranking files found, for report.json."""

    metrics: RankingMetrics | None = None
    trec_escaped_rows: int = 0  # rows whose qid or doc_id run.trec holds percent-encoded (trec_id)
    ndcg_counts: np.ndarray | None = None  # per-query NDCG@10 histogram (NDCG_BINS bins over [0, 1])
    worst: list[dict] = field(default_factory=list)  # the WORST_QUERIES lowest NDCG@10 queries, top docs
    score_range: tuple[float, float] | None = None  # lowest and highest finite score (None: no rows)
    score_counts: np.ndarray | None = None  # score histogram (SCORE_BINS bins over score_range)
    nonfinite_scores: int = 0  # NaN or infinite scores (not in the histogram)

    def scores_section(self) -> dict:
        """report.json's `scores`: every scored pair's score as a histogram (bounded)."""
        if self.score_range is None:
            return {"pairs": self.nonfinite_scores, "bins": [], "counts": [], "nonfinite": self.nonfinite_scores}
        return {"pairs": int(self.score_counts.sum()) + self.nonfinite_scores,
                "bins": _score_edges(self.score_range).tolist(), "counts": self.score_counts.astype(int).tolist(),
                "nonfinite": self.nonfinite_scores}

    def queries_section(self) -> dict | None:
        """report.json's `queries`: bounded summary of the per-query NDCG@10 (None without metrics)."""
        if self.ndcg_counts is None:
            return None
        return {"ndcg_at_10_bins": np.linspace(0.0, 1.0, NDCG_BINS + 1).tolist(),
                "ndcg_at_10_counts": self.ndcg_counts.astype(int).tolist(),
                "worst": self.worst, "file": "queries.tsv"}


@dataclass(frozen=True)
class _MetricSpec:
    labelled: bool
    judgements: Judgements | None
    recall_k: int | None


def write_ranking_outputs(store: RunStore, tag: str, labelled: bool, cancel: CancelToken | None = None,
                          queries_per_bucket: int | None = None, judgements: Judgements | None = None,
                          recall_k: int | None = None) -> RankingOutputs:
    """Build predictions.tsv, ranked.tsv, run.trec and rejects.tsv in `store.partial` from the
    committed windows (each holding `RANKING_COLUMNS`). Metrics are computed when `labelled`
    and some row is judged, or against `judgements` (qrels) when given. Sets
    `store.rank_seconds` (time spent ranking and in metrics)."""
    cancel = cancel or CancelToken()
    per_bucket = queries_per_bucket or QUERIES_PER_BUCKET  # read at call time: tests change it
    scratch = store.partial / SCRATCH
    spec = _MetricSpec(labelled, judgements, recall_k)
    try:
        try:
            out = _rank_all(store, tag, spec, cancel, per_bucket, _HashedFirstSeen())
        except _QidCollision:
            out = _rank_all(store, tag, spec, cancel, per_bucket, _ExactFirstSeen())
        _write_rejects(store, cancel)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _rank_all(store: RunStore, tag: str, spec: _MetricSpec, cancel: CancelToken, per_bucket: int,
              first_seen) -> RankingOutputs:
    store.rank_seconds = 0.0
    scratch = store.partial / SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    pieces, score_range = _predictions_and_scatter(store, scratch, cancel, per_bucket, first_seen)
    return _rank_buckets(store, scratch, pieces, tag, spec, cancel, score_range)


def _score_edges(score_range: tuple[float, float]) -> np.ndarray:
    lo, hi = score_range
    if hi <= lo:  # every score equal: one visible bin around it
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, SCORE_BINS + 1)


def _runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end positions of the runs of equal values in a sorted array."""
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
    return starts, np.append(starts[1:], len(sorted_keys))


# --------------------------------------------------------------------------- pass 1


def _predictions_and_scatter(store: RunStore, scratch: Path, cancel: CancelToken, per_bucket: int,
                             first_seen) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Write predictions.tsv and every window's bucket pieces; returns the pieces as rows of
    (bucket, window, offset, size), in window order, and the lowest and highest finite score."""
    index = [np.zeros((0, 4), dtype=np.int64)]
    lo, hi = math.inf, -math.inf
    with open(store.partial / "predictions.tsv", "w", encoding="utf-8", newline="\n") as pred:
        for w in range(store.windows):
            cancel.check()
            part = store.read_part(w, columns=RANKING_COLUMNS)
            qid = part["qid"].to_pylist()
            label, score = part["label"].to_numpy(), part["score"].to_numpy()
            pred.write("".join(f"{q}\t{format_label(y)}\t{format_score(s)}\n"
                               for q, y, s in zip(qid, label.tolist(), score.tolist())))
            finite = score[np.isfinite(score)]
            if len(finite):
                lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
            code = first_seen.codes(qid)
            table = pa.table([pa.array(code), part["row"], part["qid"], part["doc_id"], part["label"], part["score"]],
                             names=_BUCKET_SCHEMA.names).cast(_BUCKET_SCHEMA)
            index.append(_scatter_window(scratch / f"{w:06d}.arrows", w, table, code // per_bucket))
            del part, qid, table
    return np.concatenate(index), ((lo, hi) if lo <= hi else None)


def _scatter_window(path: Path, w: int, table: pa.Table, bucket: np.ndarray) -> np.ndarray:
    """The window's rows grouped by bucket (input order kept inside each), one IPC stream per
    bucket written one after another into `path`."""
    order = np.argsort(bucket, kind="stable")
    bucket = bucket[order]
    starts, ends = _runs(bucket)
    table = table.take(pa.array(order)).combine_chunks()
    rows = np.zeros((len(starts), 4), dtype=np.int64)
    offset = 0
    with open(path, "wb") as f:
        for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table.slice(s, e - s))
            buf = sink.getvalue()
            f.write(buf)
            rows[i] = (bucket[s], w, offset, buf.size)
            offset += buf.size
    return rows


# --------------------------------------------------------------------------- pass 2


def _rank_buckets(store: RunStore, scratch: Path, pieces: np.ndarray, tag: str, spec: _MetricSpec,
                  cancel: CancelToken, score_range: tuple[float, float] | None) -> RankingOutputs:
    pieces = pieces[np.argsort(pieces[:, 0], kind="stable")]  # by bucket, windows in order
    starts, ends = _runs(pieces[:, 0])
    metrics, out = [], RankingOutputs(score_range=score_range)
    if score_range is not None:
        out.score_counts = np.zeros(SCORE_BINS, dtype=np.int64)
    with open(store.partial / "ranked.tsv", "w", encoding="utf-8", newline="\n") as ranked, \
            open(store.partial / "run.trec", "w", encoding="utf-8", newline="\n") as trec, \
            open(store.partial / "queries.tsv", "w", encoding="utf-8", newline="\n") as queries:
        ranked.write("qid\tdoc_id\trank\tscore\n")
        queries.write("qid\tndcg_at_10\n")
        for s, e in zip(starts.tolist(), ends.tolist()):
            cancel.check()
            m = _rank_bucket(store, _read_bucket(scratch, pieces[s:e]), (ranked, trec, queries), tag, spec, out)
            if m is not None:
                metrics.append(m)
            release_free_memory()
    combined = combine_metrics(metrics) if metrics else None
    # Labelled input whose labels are all empty has no judgements: no metrics (with qrels there
    # are always metrics, even if no candidate is judged).
    out.metrics = combined if combined is not None and (spec.judgements is not None or combined.queries) else None
    return out


def _read_bucket(scratch: Path, pieces: np.ndarray) -> pa.Table:
    tables = []
    for _, w, offset, size in pieces.tolist():
        with open(scratch / f"{w:06d}.arrows", "rb") as f:
            f.seek(offset)
            tables.append(pa.ipc.open_stream(f.read(size)).read_all())
    return pa.concat_tables(tables)


def _rank_bucket(store: RunStore, rows: pa.Table, files, tag: str, spec: _MetricSpec,
                 out_counts: RankingOutputs) -> RankingMetrics | None:
    ranked, trec, queries = files
    code = rows["code"].to_numpy()
    # Codes follow first appearance, so sorting by code keeps rank_per_query's "qids in order of
    # first appearance" across buckets.
    first = np.argsort(code, kind="stable")
    code = code[first]
    qid = rows["qid"].to_numpy(zero_copy_only=False)[first]
    same = code[1:] == code[:-1]
    if (qid[1:][same] != qid[:-1][same]).any():
        raise _QidCollision()
    doc = rows["doc_id"].to_numpy(zero_copy_only=False)[first]
    label = rows["label"].to_numpy()[first]
    score = rows["score"].to_numpy()[first]
    row = rows["row"].to_numpy()[first]
    finite = np.isfinite(score)
    out_counts.nonfinite_scores += int((~finite).sum())
    if out_counts.score_range is not None:
        out_counts.score_counts += np.histogram(score[finite], bins=_score_edges(out_counts.score_range))[0]
    t0 = time.perf_counter()
    order, rank = rank_per_query(qid, doc, score)
    store.rank_seconds += time.perf_counter() - t0
    out = [(qid[i], doc[i], rank[i], format_score(score[i])) for i in order]
    ranked.write("".join(f"{q}\t{d}\t{r}\t{s}\n" for q, d, r, s in out))
    (trec_q, q_changed), (trec_d, d_changed) = _trec_ids(qid), _trec_ids(doc)
    out_counts.trec_escaped_rows += int((q_changed | d_changed).sum())
    trec.write("".join(f"{trec_q[i]} Q0 {trec_d[i]} {rank[i]} {s} {tag}\n" for i, (_, _, _, s) in zip(order, out)))
    if spec.judgements is None and not spec.labelled:
        return None
    t0 = time.perf_counter()
    m, q_eval, ndcg = ranking_metrics_per_query(qid, doc, label, score, judgements=spec.judgements,
                                                recall_k=spec.recall_k)
    store.rank_seconds += time.perf_counter() - t0
    _per_query(out_counts, queries, q_eval, ndcg, qid, doc, label, score, rank, row, spec.judgements)
    return m


def _per_query(out: RankingOutputs, queries, q_eval: np.ndarray, ndcg: np.ndarray, qid: np.ndarray,
               doc: np.ndarray, label: np.ndarray, score: np.ndarray, rank: np.ndarray, row: np.ndarray,
               judgements: Judgements | None) -> None:
    """queries.tsv's lines of a bucket, its share of the histogram, and the worst queries so far
    (the bucket's WORST_QUERIES lowest merged with the run's, ties by qid)."""
    queries.write("".join(f"{q}\t{format_score(v)}\n" for q, v in zip(q_eval.tolist(), ndcg.tolist())))
    counts = np.histogram(ndcg, bins=NDCG_BINS, range=(0.0, 1.0))[0]
    out.ndcg_counts = counts if out.ndcg_counts is None else out.ndcg_counts + counts
    if not len(q_eval):
        return
    pick = np.lexsort((q_eval.astype(str), ndcg))[:WORST_QUERIES]
    wanted = set(q_eval[pick].tolist())
    rows = np.flatnonzero(np.isin(qid, list(wanted)) & (rank <= WORST_TOP_DOCS))
    if judgements is not None:  # the label shown is the judgement the metrics used
        match = judgements.match(qid[rows], doc[rows])
        shown = np.full(len(rows), np.nan)
        shown[match >= 0] = judgements.relevance_of(match[match >= 0])
    else:
        shown = label[rows]
    top: dict[str, list] = {}
    for i, r in sorted(zip(rows.tolist(), shown.tolist()), key=lambda x: rank[x[0]]):
        top.setdefault(qid[i], []).append({"doc_id": doc[i], "rank": int(rank[i]), "score": float(score[i]),
                                           "label": None if math.isnan(r) else r, "row": int(row[i])})
    new = [{"qid": q, "ndcg_at_10": float(v), "top": top.get(q, [])}
           for q, v in zip(q_eval[pick].tolist(), ndcg[pick].tolist())]
    out.worst = sorted(out.worst + new, key=lambda w: (w["ndcg_at_10"], w["qid"]))[:WORST_QUERIES]


# --------------------------------------------------------------------------- rejects


def _write_rejects(store: RunStore, cancel: CancelToken) -> None:
    """Windows cover consecutive rows and each window's rejects are sorted by row, so writing
    them window after window is input order."""
    with open(store.partial / "rejects.tsv", "w", encoding="utf-8", newline="\n") as out:
        out.write("\t".join(REJECT_COLUMNS) + "\n")
        for w in range(store.windows):
            cancel.check()
            t = store.read_rejects(w)
            cols = [t[c].to_pylist() for c in REJECT_COLUMNS]
            out.write("".join("\t".join(map(str, fields)) + "\n" for fields in zip(*cols)))
