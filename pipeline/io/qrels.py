"""Relevance judgement files (`--qrels FILE`) read into a `pipeline.ranking.Judgements` (no paddle).

Two layouts, told apart by the first non-blank line:

* TREC qrels: ``qid iteration doc_id relevance``, fields separated by any run of spaces or tabs,
  no header; the iteration field is ignored.
* BEIR ``qrels/*.tsv``: a header ``query-id<TAB>corpus-id<TAB>score``, then
  ``qid<TAB>doc_id<TAB>relevance`` lines; fields are stripped of surrounding whitespace, as the
  dataset reader strips ids.

A ``.gz`` file is gunzipped; a UTF-8 BOM is skipped; blank lines are skipped. Relevance is any
finite number (``2``, ``-1``, ``0.5``, ``1e0``); the metrics treat relevance <= 0 as not relevant.
Anything else is an `InputError` naming the file, the 1-based line and the field: a wrong number
of fields, an empty id, a relevance that is not a finite number, a line that is not UTF-8, a
(qid, doc_id) pair judged twice (with the line that judged it first), or a file without any
judgement.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from pipeline.io.rows import InputError
from pipeline.ranking.judgements import DuplicateJudgement, Judgements

__all__ = ["BEIR_HEADER", "read_qrels"]

BEIR_HEADER = ("query-id", "corpus-id", "score")
_BOM = b"\xef\xbb\xbf"
_READ_ERRORS = (OSError, EOFError, zlib.error)  # a disk error, a gzip file cut short


def _relevance(path, line: int, text: str) -> float:
    try:
        if "_" in text:  # float() would take "1_0" for 10
            raise ValueError
        x = float(text)
    except ValueError:
        raise InputError(f"{path}: line {line}: relevance {text!r} is not a number") from None
    if not math.isfinite(x):
        raise InputError(f"{path}: line {line}: relevance {text!r} is not a finite number")
    return x


def read_qrels(path: str | Path) -> Judgements:
    """The judgements of a TREC qrels or BEIR qrels/*.tsv file (see the module docstring)."""
    shown = path
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{shown}: no such file")
    qids: list[str] = []
    docs: list[str] = []
    rels: list[float] = []
    lines: list[int] = []
    interned: dict[str, str] = {}  # one str object per qid: a qid costs 8 bytes a judgement
    layout = None
    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
            for number, raw in enumerate(f, start=1):
                if number == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{shown}: line {number}: not valid UTF-8 (byte {e.start})") from None
                if not text.strip():
                    continue
                if layout is None:
                    layout = _layout(shown, number, text)
                    if layout == "beir":
                        continue  # the header
                if layout == "trec":
                    fields = text.split()
                    if len(fields) != 4:
                        raise InputError(f"{shown}: line {number}: {len(fields)} fields, TREC qrels lines have 4 "
                                         f"(qid iteration doc_id relevance)")
                    qid, _, doc, rel = fields
                else:
                    fields = text.rstrip("\r\n").split("\t")
                    if len(fields) != 3:
                        raise InputError(f"{shown}: line {number}: {len(fields)} tab-separated fields, BEIR qrels "
                                         f"lines have 3 ({', '.join(BEIR_HEADER)})")
                    qid, doc, rel = (x.strip() for x in fields)
                    if not qid or not doc:
                        raise InputError(f"{shown}: line {number}: empty {'query-id' if not qid else 'corpus-id'}")
                qids.append(interned.setdefault(qid, qid))
                docs.append(doc)
                rels.append(_relevance(shown, number, rel))
                lines.append(number)
    except _READ_ERRORS as e:
        raise InputError(f"{shown}: cannot read: {e}") from None
    if not qids:
        raise InputError(f"{shown}: no judgements (empty file)" if layout is None
                         else f"{shown}: no judgements after the header")
    try:
        return Judgements.from_arrays(np.array(qids, dtype=object), np.array(docs, dtype=object),
                                      np.array(rels, dtype=np.float64), layout=layout)
    except DuplicateJudgement as e:
        qid_name, doc_name = ("query-id", "corpus-id") if layout == "beir" else ("qid", "doc_id")
        raise InputError(f"{shown}: line {lines[e.second]}: {qid_name} {e.qid!r} {doc_name} {e.doc_id!r} is judged "
                         f"twice (first at line {lines[e.first]})") from None


def _layout(shown, number: int, text: str) -> str:
    tab_fields = [x.strip() for x in text.rstrip("\r\n").split("\t")]
    if tuple(x.lower() for x in tab_fields) == BEIR_HEADER:
        return "beir"
    fields = text.split()
    if len(fields) == 4:
        return "trec"
    raise InputError(f"{shown}: line {number}: neither a TREC qrels line (qid iteration doc_id relevance, 4 fields; "
                     f"this one has {len(fields)}) nor the BEIR header ({chr(9).join(BEIR_HEADER)!r})")
