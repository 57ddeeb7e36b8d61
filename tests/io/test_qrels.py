"""pipeline.io.qrels.read_qrels: TREC qrels and BEIR qrels/*.tsv, plain or gzipped, and its errors
(each names the file, the 1-based line and the field)."""

from __future__ import annotations

import gzip
import pickle
import re

import numpy as np
import pytest

from pipeline.io.qrels import read_qrels
from pipeline.io.rows import InputError
from pipeline.ranking import Judgements, ranking_metrics

TREC = "q1 0 d1 1\nq1\t0  d2   0\n\n  \nq2 Q0 é 2\r\nq2 0 中 -1\nq3 0 d1 0.5\nq3 0 d9 1e0\n"
BEIR = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\t d2 \t0\n\nq2\té\t2\r\nq2\t中\t-1\nq3\td1\t0.5\nq3\td9\t1e0\n"
WANT = {("q1", "d1"): 1.0, ("q1", "d2"): 0.0, ("q2", "é"): 2.0, ("q2", "中"): -1.0, ("q3", "d1"): 0.5,
        ("q3", "d9"): 1.0}


def write(path, text: str, gz: bool = False, bom: bool = False):
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def content(j: Judgements) -> dict[tuple[str, str], float]:
    pairs = list(WANT) + [("q1", "d9"), ("q4", "d1")]
    rel = j.relevance(np.array([q for q, _ in pairs], dtype=object), np.array([d for _, d in pairs], dtype=object))
    return {p: r for p, r in zip(pairs, rel.tolist()) if not np.isnan(r)}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["trec", "beir"])
def test_both_layouts_plain_and_gzipped(tmp_path, layout, gz) -> None:
    name = ("qrels.txt" if layout == "trec" else "test.tsv") + (".gz" if gz else "")
    j = read_qrels(write(tmp_path / name, TREC if layout == "trec" else BEIR, gz=gz, bom=gz))
    assert content(j) == WANT
    assert (len(j), j.n_queries, j.qids.tolist()) == (6, 3, ["q1", "q2", "q3"])
    assert content(pickle.loads(pickle.dumps(j))) == WANT
    assert j.summary() == {"layout": layout, "judgements": 6, "queries": 3, "relevant_judgements": 4,
                           "queries_without_relevant": 0}
    assert pickle.loads(pickle.dumps(j)).layout == layout


def test_the_layout_comes_from_the_first_line_not_the_name(tmp_path) -> None:
    assert content(read_qrels(write(tmp_path / "a.tsv", TREC))) == WANT
    assert content(read_qrels(write(tmp_path / "b.txt", "\n" + BEIR))) == WANT
    assert content(read_qrels(write(tmp_path / "c", BEIR.replace("query-id", "Query-ID")))) == WANT


def test_qrels_feed_the_metrics(tmp_path) -> None:
    j = read_qrels(write(tmp_path / "q.txt", "q1 0 a 0\nq1 0 b 1\nq1 0 missing 2\n"))
    m = ranking_metrics(np.array(["q1", "q1"], dtype=object), np.array(["a", "b"], dtype=object),
                        np.array([np.nan, np.nan]), np.array([2.0, 1.0]), judgements=j)
    assert m.mrr_at_10 == 0.5 and m.relevant_missing == 1 and m.judged_by == "qrels"


@pytest.mark.parametrize("text, where, message", [
    ("q1 0 d1 1\nq1 0 d2 x\n", "line 2", "relevance 'x' is not a number"),
    ("q1 0 d1 1\nq1 0 d2 1_0\n", "line 2", "relevance '1_0' is not a number"),
    ("q1 0 d1 nan\n", "line 1", "relevance 'nan' is not a finite number"),
    ("q1 0 d1 inf\n", "line 1", "relevance 'inf' is not a finite number"),
    ("q1 0 d1 1\n\nq1 0 d2\n", "line 3", "3 fields, TREC qrels lines have 4"),
    ("q1 0 d1 1\nq1 0 d2 1 extra\n", "line 2", "5 fields"),
    ("q1 d1 1\n", "line 1", "neither a TREC qrels line"),
    ("q1 0 d1 1\nq2 0 d1 2\nq1 0 d1 1\n", "line 3", "qid 'q1' doc_id 'd1' is judged twice (first at line 1)"),
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\n", "line 3", "2 tab-separated fields, BEIR qrels lines have 3"),
    ("query-id\tcorpus-id\tscore\nq1\t\t1\n", "line 2", "empty corpus-id"),
    ("query-id\tcorpus-id\tscore\n \td1\t1\n", "line 2", "empty query-id"),
    ("query-id\tcorpus-id\tscore\nq1\td1\tone\n", "line 2", "relevance 'one' is not a number"),
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t0\n", "line 3",
     "query-id 'q1' corpus-id 'd1' is judged twice (first at line 2)"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, text, where, message) -> None:
    path = write(tmp_path / "qrels.txt", text)
    with pytest.raises(InputError, match=re.escape(f"{path}: {where}: {message}")):
        read_qrels(path)


def test_bad_files(tmp_path) -> None:
    for text, message in (("", "no judgements (empty file)"), ("\n \n", "no judgements (empty file)"),
                          ("query-id\tcorpus-id\tscore\n\n", "no judgements after the header")):
        path = write(tmp_path / "qrels.txt", text)
        with pytest.raises(InputError, match=re.escape(f"{path}: {message}")):
            read_qrels(path)
    with pytest.raises(InputError, match="no such file"):
        read_qrels(tmp_path / "absent.txt")
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"q1 0 d1 1\nq1 0 caf\xe9 1\n")
    with pytest.raises(InputError, match=re.escape(f"{path}: line 2: not valid UTF-8")):
        read_qrels(path)
    path = tmp_path / "cut.txt.gz"
    path.write_bytes(gzip.compress(b"q1 0 d1 1\n" * 1000)[:-30])
    with pytest.raises(InputError, match=re.escape(f"{path}: cannot read")):
        read_qrels(path)
