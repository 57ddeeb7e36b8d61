"""Shared writers and readers for the tests of pipeline.io (not a test module).

Every fixture is written into a temporary folder by the plain writers here (csv/json/pyarrow) and
read back through `DatasetReader`. `read_all` checks the invariant every test relies on: each
input record is either accepted or rejected exactly once, with its global row index and its
physical line, and the per-file counts say so.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.reader import DatasetReader, Reject, detect_format


TEXT_COLUMNS = ["qid", "query", "doc_id", "doc", "label"]


# Texts with the characters each format must carry through untouched: commas and double quotes
# (CSV quoting, literal in TSV), single quotes, non-ASCII, leading/trailing spaces.
ROWS = [
    {"qid": "q1", "query": 'what is "ernie", really?', "doc_id": "d1", "doc": "a doc, with commas", "label": 2},
    {"qid": "q1", "query": 'what is "ernie", really?', "doc_id": "d2", "doc": " spaced text ", "label": 0.5},
    {"qid": "q2", "query": "ünïcödé 查询", "doc_id": "d1", "doc": "it's \"quoted\"", "label": 0},
    {"qid": "q3", "query": "x", "doc_id": "17", "doc": "y", "label": 1},
    {"qid": "q3", "query": "x", "doc_id": "18", "doc": "z", "label": 3},
]


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "wb"), encoding="utf-8", newline="")
    return open(path, "w", encoding="utf-8", newline="")


def write(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Write `rows` in the format named by `path`'s suffix; `columns` fixes the header order."""
    columns = columns or list(rows[0])
    fmt = detect_format(path)
    if fmt == "parquet":
        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
        return path
    with _open_text(path) as f:
        if fmt == "tsv":
            f.write("\t".join(columns) + "\n")
            for r in rows:
                f.write("\t".join(_cell(r.get(c)) for c in columns) + "\n")
        elif fmt == "csv":
            w = csv.writer(f, lineterminator="\n")
            w.writerow(columns)
            w.writerows([[_cell(r.get(c)) for c in columns] for r in rows])
        else:
            for r in rows:
                f.write(json.dumps({c: r[c] for c in columns if c in r}, ensure_ascii=False) + "\n")
    return path


def _cell(value) -> str:
    return json.dumps(value) if isinstance(value, list) else str(value)


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


TSV_HEADER = b"qid\tquery\tdoc_id\tdoc\tlabel\n"


def read_all(paths, **kwargs) -> tuple[list[dict], list[Reject], DatasetReader]:
    """All accepted rows as dicts (with row and line), all rejects, and the reader."""
    reader = DatasetReader(paths, **kwargs)
    rows: list[dict] = []
    rejects: list[Reject] = []
    for chunk, rej in reader.chunks():
        rejects.extend(rej)
        if chunk is None:
            continue
        for i in range(len(chunk)):
            row = {"file": chunk.file, "row": int(chunk.row[i]), "line": int(chunk.line[i]),
                   "qid": chunk.qid[i], "doc_id": chunk.doc_id[i]}
            if chunk.query is not None:
                row.update(query=chunk.query[i], doc=chunk.doc[i])
            if chunk.input_ids is not None:
                row.update(input_ids=chunk.input_ids[i], token_type_ids=chunk.token_type_ids[i])
            if chunk.label is not None:
                row["label"] = float(chunk.label[i])
            rows.append(row)
    check_accounting(reader, rows, rejects)
    return rows, rejects, reader


def check_accounting(reader: DatasetReader, rows: list[dict], rejects: list[Reject]) -> None:
    """Each record is accepted or rejected exactly once, and the per-file counts say so."""
    indices = sorted([r["row"] for r in rows] + [r.row for r in rejects])
    assert indices == list(range(len(indices)))
    assert sum(c.rows_read for c in reader.counts.values()) == len(indices)
    for name, count in reader.counts.items():
        accepted = sum(1 for r in rows if r["file"] == name)
        rejected = sum(1 for r in rejects if r.file == name)
        assert count.rows_rejected == rejected
        assert count.rows_read == accepted + rejected


def texts(rows: list[dict]) -> list[tuple]:
    return [(r["qid"], r["query"], r["doc_id"], r["doc"], r["label"]) for r in rows]


def expected(rows: list[dict]) -> list[tuple]:
    return [(r["qid"], r["query"], r["doc_id"], r["doc"], float(r["label"])) for r in rows]


def reasons_by_line(rejects: list[Reject]) -> dict[int, str]:
    return {r.line: r.reason for r in rejects}
