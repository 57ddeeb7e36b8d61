"""Output files (no paddle): written under temporary names, moved into place only at the end.

A run that fails leaves no file that looks complete: everything is written into
`OUT/.partial/` and `commit()` moves each finished file into `OUT/` with os.replace.

Files:
- `predictions.tsv`: `qid \\t label \\t score` per scored pair, in input order (the
  competition layout), streamed as windows finish.
- `rejects.tsv`: `file, line, row, qid, doc_id, reason` per rejected row, streamed.
- `ranked.tsv`: `qid, doc_id, rank, score`, per qid by descending score (ties by doc_id).
- `run.trec`: the same ranking as a TREC run file.
- `report.json`: counts, stage times, settings, model, metrics.
- `submission.zip`: predictions.tsv + report.json, ready to upload.
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np

from pipeline.reader import Reject

PARTIAL = ".partial"
FILES = ("predictions.tsv", "rejects.tsv", "ranked.tsv", "run.trec", "report.json", "submission.zip")


def format_score(x: float) -> str:
    """Full precision: the shortest text that reads back as the same double."""
    return repr(float(x))


def format_label(x: float) -> str:
    if math.isnan(x):
        return ""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _clean(s: str) -> str:
    """Fields of our TSV outputs never contain a tab or newline, whatever the input held."""
    return s.replace("\t", " ").replace("\n", " ").replace("\r", " ")


class OutputWriter:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.partial = out_dir / PARTIAL
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self._pred = open(self.partial / "predictions.tsv", "w", encoding="utf-8", newline="\n")
        self._rej = open(self.partial / "rejects.tsv", "w", encoding="utf-8", newline="\n")
        self._rej.write("file\tline\trow\tqid\tdoc_id\treason\n")

    def write_predictions(self, qid: list[str], label: np.ndarray, score: np.ndarray) -> None:
        self._pred.write("".join(
            f"{_clean(q)}\t{format_label(l)}\t{format_score(s)}\n" for q, l, s in zip(qid, label, score)
        ))

    def write_rejects(self, rejects: list[Reject]) -> None:
        self._rej.write("".join(
            f"{_clean(r.file)}\t{r.line}\t{r.row}\t{_clean(r.qid)}\t{_clean(r.doc_id)}\t{_clean(r.reason)}\n"
            for r in rejects
        ))

    def write_ranking(self, qid: np.ndarray, doc_id: np.ndarray, score: np.ndarray, order: np.ndarray,
                      rank: np.ndarray, tag: str) -> None:
        with open(self.partial / "ranked.tsv", "w", encoding="utf-8", newline="\n") as ranked, \
                open(self.partial / "run.trec", "w", encoding="utf-8", newline="\n") as trec:
            ranked.write("qid\tdoc_id\trank\tscore\n")
            block = 65536
            for start in range(0, len(order), block):
                idx = order[start:start + block]
                rows = [(_clean(qid[i]), _clean(doc_id[i]), rank[i], format_score(score[i])) for i in idx]
                ranked.write("".join(f"{q}\t{d}\t{r}\t{s}\n" for q, d, r, s in rows))
                # TREC fields are space-separated: spaces inside ids would shift columns.
                trec.write("".join(
                    f"{q.replace(' ', '_')} Q0 {d.replace(' ', '_')} {r} {s} {tag}\n" for q, d, r, s in rows
                ))

    def write_report(self, report: dict) -> None:
        text = json.dumps(report, indent=2, allow_nan=False) + "\n"
        (self.partial / "report.json").write_text(text, encoding="utf-8")

    def commit(self) -> None:
        """Close the streams, build the submission zip, and move every file into place."""
        self._pred.close()
        self._rej.close()
        with zipfile.ZipFile(self.partial / "submission.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(self.partial / "predictions.tsv", "predictions.tsv")
            z.write(self.partial / "report.json", "report.json")
        for name in FILES:
            (self.partial / name).replace(self.out_dir / name)
        self.partial.rmdir()

    def abort(self) -> None:
        for f in (self._pred, self._rej):
            f.close()
        shutil.rmtree(self.partial, ignore_errors=True)
