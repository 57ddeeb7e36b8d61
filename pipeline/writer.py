"""Run state and output files (no paddle).

A run commits its results window by window into `OUT/.partial/`:
- `part-NNNNNN.tsv`: `row, file, line, qid, doc_id, label, score` of the window's scored rows;
- `rejects-NNNNNN.tsv`: the window's rejected rows with their reasons;
- `manifest.json`: how many windows and reader chunks are committed, the run's counters, and a
  fingerprint of inputs, model and settings. It is replaced atomically after the parts are on
  disk, so a run killed at any point resumes from the last manifest (`--resume`).

At the end `finish()` builds the final files from the parts and moves each into `OUT/`:
a failed or interrupted run never leaves a file there that looks complete.

- `predictions.tsv`: `qid \\t label \\t score` per scored pair, in input order (competition layout).
- `rejects.tsv`: `file, line, row, qid, doc_id, reason` per rejected row, in input order.
- `ranked.tsv`: `qid, doc_id, rank, score`, per qid by descending score (ties by doc_id).
- `run.trec`: the same ranking as a TREC run file.
- `report.json`: counts, stage times, settings, model, metrics.
- `submission.zip`: predictions.tsv + report.json, ready to upload.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.memory import release_free_memory
from pipeline.ranking import RankingMetrics, combine_metrics, rank_per_query, ranking_metrics
from pipeline.reader import Reject

PARTIAL = ".partial"
MANIFEST = "manifest.json"
FILES = ("predictions.tsv", "rejects.tsv", "ranked.tsv", "run.trec", "report.json", "submission.zip")
REJECT_COLUMNS = ["file", "line", "row", "qid", "doc_id", "reason"]
PART_COLUMNS = ["row", "file", "line", "qid", "doc_id", "label", "score"]
QUERIES_PER_BUCKET = 4096


class ResumeError(Exception):
    """An unfinished run is in the way, or does not match this one; the message says what to do."""


def format_score(x: float) -> str:
    """Full precision: the shortest text that reads back as the same double."""
    return repr(float(x))


def format_label(x: float) -> str:
    if math.isnan(x):
        return ""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def clean(s: str) -> str:
    """Fields of our TSV outputs never contain a tab or newline, whatever the input held."""
    return s.replace("\t", " ").replace("\n", " ").replace("\r", " ")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _read_tsv(path: Path, dtypes: dict) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=dtypes, keep_default_na=False,
                       na_values={"label": [""]}, float_precision="round_trip", encoding="utf-8")


class RunStore:
    def __init__(self, out_dir: Path, fingerprint: dict, resume: bool, restart: bool):
        self.out_dir = out_dir
        self.partial = out_dir / PARTIAL
        self.fingerprint = fingerprint
        manifest = self._load_manifest()
        if manifest and manifest["windows"] > 0 and not (resume or restart):
            raise ResumeError(
                f"{self.partial} holds an unfinished run ({manifest['rows_committed']} rows committed); "
                f"pass --resume to continue it or --restart to discard it"
            )
        if manifest and resume:
            if manifest["fingerprint"] != fingerprint:
                diff = sorted(k for k in set(fingerprint) | set(manifest["fingerprint"])
                              if fingerprint.get(k) != manifest["fingerprint"].get(k))
                raise ResumeError(
                    f"the unfinished run in {self.partial} was made with other {', '.join(diff)}; "
                    f"resume with the same inputs, model and settings, or pass --restart to start over"
                )
            self.manifest = manifest
            # Parts written after the last manifest belong to no committed window.
            for p in self.partial.glob("*-*.tsv"):
                if int(p.stem.split("-")[1]) >= manifest["windows"]:
                    p.unlink()
        else:
            if self.partial.exists():
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
            self.manifest = {"fingerprint": fingerprint, "windows": 0, "chunks": 0, "rows_committed": 0,
                             "tally": {}, "sessions": 0}
        self.manifest["sessions"] += 1

    def _load_manifest(self) -> dict | None:
        path = self.partial / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    @property
    def windows(self) -> int:
        return self.manifest["windows"]

    @property
    def chunks(self) -> int:
        return self.manifest["chunks"]

    @property
    def resumed(self) -> bool:
        return self.manifest["sessions"] > 1

    def commit_window(self, scored: dict[str, np.ndarray | list], rejects: list[Reject], chunks: int,
                      tally: dict) -> None:
        """Make one window durable: parts first, then the manifest that points at them."""
        w = self.manifest["windows"]
        lines = ["\t".join(PART_COLUMNS)]
        lines += [f"{r}\t{f}\t{ln}\t{clean(q)}\t{clean(d)}\t{format_label(y)}\t{format_score(s)}"
                  for r, f, ln, q, d, y, s in zip(*(scored[c] for c in PART_COLUMNS))]
        _write_atomic(self.partial / f"part-{w:06d}.tsv", "\n".join(lines) + "\n")
        lines = ["\t".join(REJECT_COLUMNS)]
        lines += [f"{clean(r.file)}\t{r.line}\t{r.row}\t{clean(r.qid)}\t{clean(r.doc_id)}\t{clean(r.reason)}"
                  for r in rejects]
        _write_atomic(self.partial / f"rejects-{w:06d}.tsv", "\n".join(lines) + "\n")
        self.manifest.update(windows=w + 1, chunks=chunks, tally=tally,
                             rows_committed=self.manifest["rows_committed"] + len(scored["row"]) + len(rejects))
        _write_atomic(self.partial / MANIFEST, json.dumps(self.manifest, indent=1))

    def write_outputs(self, tag: str, labelled: bool) -> RankingMetrics | None:
        """Build predictions, rankings and rejects from the committed windows, streaming.

        Memory stays flat in the number of rows: parts are read one at a time; for the ranking,
        rows are spread over bucket files by query (QUERIES_PER_BUCKET queries each, in order of
        first appearance) and each bucket is ranked on its own. What grows is only the
        per-query state: the map from qid to its order of first appearance."""
        p = self.partial
        buckets_dir = p / "buckets"
        buckets_dir.mkdir(exist_ok=True)
        code_of: dict[str, int] = {}
        bucket_files: dict[int, object] = {}
        with open(p / "predictions.tsv", "w", encoding="utf-8", newline="\n") as pred:
            for w in range(self.windows):
                part = _read_tsv(p / f"part-{w:06d}.tsv", {"qid": str, "doc_id": str})
                qid = part["qid"].tolist()
                label = part["label"].to_numpy(np.float64)
                score = part["score"].to_numpy(np.float64)
                pred.write("".join(f"{q}\t{format_label(y)}\t{format_score(s)}\n"
                                   for q, y, s in zip(qid, label, score)))
                codes = np.fromiter((code_of.setdefault(q, len(code_of)) for q in qid), np.int64, len(qid))
                bucket = codes // QUERIES_PER_BUCKET
                part.insert(0, "code", codes)
                for b in np.unique(bucket):
                    f = bucket_files.get(int(b))
                    if f is None:
                        f = bucket_files[int(b)] = open(buckets_dir / f"{int(b):06d}.tsv", "w", encoding="utf-8",
                                                        newline="\n")
                        f.write("code\tdoc_id\tlabel\tscore\n")
                    sel = part[bucket == b]
                    f.write("".join(f"{c}\t{d}\t{format_label(y)}\t{format_score(s)}\n" for c, d, y, s in zip(
                        sel["code"].tolist(), sel["doc_id"].tolist(), sel["label"].tolist(), sel["score"].tolist())))
        for f in bucket_files.values():
            f.close()
        qids = list(code_of)
        del code_of
        metrics = []
        self.rank_seconds = 0.0
        with open(p / "ranked.tsv", "w", encoding="utf-8", newline="\n") as ranked, \
                open(p / "run.trec", "w", encoding="utf-8", newline="\n") as trec:
            ranked.write("qid\tdoc_id\trank\tscore\n")
            for b in sorted(bucket_files):
                rows = _read_tsv(buckets_dir / f"{b:06d}.tsv", {"doc_id": str, "code": np.int64})
                code = rows["code"].to_numpy()
                # Codes follow first appearance, so sorting by code keeps rank_per_query's
                # "qids in order of first appearance" across buckets.
                first = np.argsort(code, kind="stable")
                qid = np.array(qids, dtype=object)[code[first]]
                doc = rows["doc_id"].to_numpy(object)[first]
                label = rows["label"].to_numpy(np.float64)[first]
                score = rows["score"].to_numpy(np.float64)[first]
                t0 = time.perf_counter()
                order, rank = rank_per_query(qid, doc, score)
                self.rank_seconds += time.perf_counter() - t0
                out = [(qid[i], doc[i], rank[i], format_score(score[i])) for i in order]
                ranked.write("".join(f"{q}\t{d}\t{r}\t{s}\n" for q, d, r, s in out))
                # TREC fields are space-separated: spaces inside ids would shift columns.
                trec.write("".join(f"{q.replace(' ', '_')} Q0 {d.replace(' ', '_')} {r} {s} {tag}\n"
                                   for q, d, r, s in out))
                if labelled and not np.all(np.isnan(label)):
                    t0 = time.perf_counter()
                    metrics.append(ranking_metrics(qid, doc, label, score))
                    self.rank_seconds += time.perf_counter() - t0
                del rows, out, qid, doc, label, score
                release_free_memory()
        shutil.rmtree(buckets_dir)
        # Windows cover consecutive rows and each rejects file is sorted, so concatenation is
        # already in input order.
        with open(p / "rejects.tsv", "w", encoding="utf-8", newline="\n") as out:
            out.write("\t".join(REJECT_COLUMNS) + "\n")
            for w in range(self.windows):
                with open(p / f"rejects-{w:06d}.tsv", encoding="utf-8") as f:
                    next(f)
                    shutil.copyfileobj(f, out)
        return combine_metrics(metrics) if metrics else None

    def write_report(self, report: dict) -> None:
        p = self.partial
        (p / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        with zipfile.ZipFile(p / "submission.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(p / "predictions.tsv", "predictions.tsv")
            z.write(p / "report.json", "report.json")

    def publish(self) -> None:
        """Move every final file into OUT, then drop the run state."""
        for name in FILES:
            (self.partial / name).replace(self.out_dir / name)
        shutil.rmtree(self.partial)

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
