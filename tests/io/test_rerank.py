"""Reranking layouts: queries + corpus + candidates joined into the pair stream
(pipeline.io.rerank, pipeline.io.corpus)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.corpus import CorpusIndex, load_queries
from pipeline.io.rerank import RerankReader, RerankSources
from pipeline.io.rows import InputError

CORPUS = [
    {"_id": "d1", "title": "Paris", "text": "Paris is the capital of France."},
    {"_id": "d2", "title": "", "text": "Berlin is in Germany."},
    {"_id": "d3", "text": 'Rome, the "eternal" city.'},  # no title
    {"_id": "d4", "title": "Only a title"},
    {"_id": "é 5", "title": " spaced ", "text": " out "},
]
QUERIES = [{"_id": "q1", "text": "capital of france"}, {"_id": "q2", "text": "german city"},
           {"_id": "q3", "text": "unused"}]


def write_jsonl(path: Path, objs: list[dict], extra: bytes = b"") -> Path:
    path.write_bytes(b"".join(json.dumps(o, ensure_ascii=False).encode() + b"\n" for o in objs) + extra)
    return path


def beir(tmp_path: Path, run: str, corpus_extra: bytes = b"") -> RerankSources:
    return RerankSources(write_jsonl(tmp_path / "queries.jsonl", QUERIES),
                         write_jsonl(tmp_path / "corpus.jsonl", CORPUS, corpus_extra),
                         _write(tmp_path / "run.trec", run))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def read_all(reader: RerankReader):
    rows, rejects = [], []
    for chunk, rej in reader.chunks():
        rejects += rej
        if chunk is not None:
            for i in range(len(chunk)):
                rows.append({"line": int(chunk.line[i]), "row": int(chunk.row[i]), "qid": chunk.qid[i],
                             "doc_id": chunk.doc_id[i], "query": chunk.query[i], "doc": chunk.doc[i],
                             "label": None if chunk.label is None else float(chunk.label[i])})
    return rows, rejects


def test_beir_run_joined_with_titles_as_beir_joins_them(tmp_path):
    run = "q1 Q0 d1 1 3.0 bm25\nq1 Q0 d3 2 2.0 bm25\nq1 Q0 d4 3 1.5 bm25\n\nq2\tQ0  d2 1 7 bm25\n"
    reader = RerankReader(beir(tmp_path, run))
    rows, rejects = read_all(reader)
    assert rejects == []
    assert [(r["qid"], r["doc_id"], r["line"], r["row"]) for r in rows] == [
        ("q1", "d1", 1, 0), ("q1", "d3", 2, 1), ("q1", "d4", 3, 2), ("q2", "d2", 5, 3)]
    docs = {r["doc_id"]: r["doc"] for r in rows}
    # (title + " " + text).strip(), as beir/reranking/rerank.py builds its sentence pairs
    assert docs["d1"] == "Paris Paris is the capital of France."
    assert docs["d3"] == 'Rome, the "eternal" city.'
    assert docs["d4"] == "Only a title"
    assert {r["qid"]: r["query"] for r in rows} == {"q1": "capital of france", "q2": "german city"}
    assert reader.has_label is False and all(r["label"] is None for r in rows)


def test_missing_ids_and_malformed_lines_are_rejected_with_reasons(tmp_path):
    run = ("q1 Q0 d1 1 3.0 t\n"
           "q1 Q0 d9 2 2.0 t\n"  # doc not in the corpus
           "q7 Q0 d1 1 1.0 t\n"  # query not in the queries
           "q1 Q0 d2 3\n"  # 4 fields
           "\n"
           "q1 Q0 d2 x 1.0 t\n"  # rank not an integer
           "q1 Q0 d2 4 nan t\n"
           "q1 Q0 d2 5 high t\n"
           "q1 Q0 d1 6 0.5 t\n")  # duplicate pair
    src = beir(tmp_path, run, corpus_extra=b'{"title": "no id"}\n')
    rows, rejects = read_all(RerankReader(src))
    assert [(r["line"], r["doc_id"]) for r in rows] == [(1, "d1")]
    got = {r.line: (r.reason, r.qid, r.doc_id) for r in rejects}
    assert got[2] == (f"doc id 'd9' is not in {src.corpus} (which has 1 unreadable lines, first line 6: "
                      f"no string '_id')", "q1", "d9")
    assert got[3] == (f"query id 'q7' is not in {src.queries}", "q7", "d1")
    assert got[4][0].startswith("wrong number of fields for a TREC run line (qid Q0 doc_id rank score tag): "
                                "expected 6, got 4")
    assert got[6][0] == "rank 'x' is not an integer"
    assert got[7][0] == "score 'nan' is not a finite number"
    assert got[8][0] == "score 'high' is not a number"
    assert got[9][0].startswith("duplicate (qid, doc_id) = ('q1', 'd1'), first seen at")
    assert sorted(got) == [2, 3, 4, 6, 7, 8, 9]  # every candidate line is a row or a reject


def test_depth_keeps_the_top_k_by_score_ties_in_file_order(tmp_path):
    # q1's scores out of order, with a tie at the cut; q2 has fewer than K
    run = ("q1 Q0 d1 4 1.0 t\nq2 Q0 d2 1 5.0 t\nq1 Q0 d2 1 9.0 t\nq1 Q0 d3 2 5.0 t\n"
           "q1 Q0 d4 3 5.0 t\nq1 Q0 é_5 5 0.5 t\n")
    src = beir(tmp_path, run)
    reader = RerankReader(RerankSources(src.queries, src.corpus, src.candidates, depth=2))
    rows, rejects = read_all(reader)
    assert rejects == []
    # file order is kept; the kept set is {q1: d2 (9.0), d3 (5.0, first of the tie)}, {q2: d2}
    assert [(r["qid"], r["doc_id"], r["line"]) for r in rows] == [("q2", "d2", 2), ("q1", "d2", 3), ("q1", "d3", 4)]
    report = reader.layout_report()
    assert report["candidates"]["beyond_depth"] == 3 and report["candidates"]["depth"] == 2
    # BEIR keeps the same set: sorted(results.items(), key=score, reverse=True)[:top_k] (stable)
    by_query: dict[str, list[tuple[str, float]]] = {}
    for line in run.splitlines():
        q, _, d, _, s, _ = line.split()
        by_query.setdefault(q, []).append((d, float(s)))
    beir_kept = {(q, d) for q, docs in by_query.items() for d, _ in sorted(docs, key=lambda x: x[1], reverse=True)[:2]}
    assert {(r["qid"], r["doc_id"]) for r in rows} == beir_kept


def test_msmarco_tsv_layouts_keep_quotes_literal(tmp_path):
    queries = _write(tmp_path / "queries.tsv", '1\twhat is "rome"\n2\tgerman city\n')
    collection = _write(tmp_path / "collection.tsv", '10\t"Rome" is old.\tand has a tab\n11\tBerlin.\r\n12 no tab\n')
    run = _write(tmp_path / "run.txt", "1 Q0 10 1 2 t\n2 Q0 11 1 1 t\n2 Q0 12 2 0 t\n")
    rows, rejects = read_all(RerankReader(RerankSources(queries, collection, run)))
    assert [(r["qid"], r["query"], r["doc_id"], r["doc"]) for r in rows] == [
        ("1", 'what is "rome"', "10", '"Rome" is old.\tand has a tab'), ("2", "german city", "11", "Berlin.")]
    assert len(rejects) == 1 and rejects[0].reason.startswith(f"doc id '12' is not in {collection} (which has 1 "
                                                              f"unreadable lines, first line 3: no tab")


def test_pair_file_candidates_with_labels_and_unjudged_rows(tmp_path):
    src = beir(tmp_path, "unused")
    pairs = tmp_path / "cands.parquet"
    pq.write_table(pa.table({"qid": ["q1", "q1", "q2", "q2"], "doc_id": ["d1", "d2", "d2", "d3"],
                             "label": [2.0, None, 1.0, 0.0]}), pairs)
    reader = RerankReader(RerankSources(src.queries, src.corpus, pairs, depth=1))
    rows, rejects = read_all(reader)
    assert rejects == [] and reader.has_label
    assert [(r["qid"], r["doc_id"], r["label"]) for r in rows] == [("q1", "d1", 2.0), ("q2", "d2", 1.0)]
    reader = RerankReader(RerankSources(src.queries, src.corpus, pairs))
    rows, _ = read_all(reader)
    assert math.isnan(rows[1]["label"]) and len(rows) == 4


def test_candidates_pair_file_needs_ids(tmp_path):
    src = beir(tmp_path, "unused")
    bad = _write(tmp_path / "cands.tsv", "query\tdoc\nx\ty\n")
    with pytest.raises(InputError, match="needs the columns 'qid' and 'doc_id'"):
        RerankReader(RerankSources(src.queries, src.corpus, bad))


def test_gzipped_corpus_is_refused_with_the_fix(tmp_path):
    src = beir(tmp_path, "q1 Q0 d1 1 1 t\n")
    gz = tmp_path / "corpus.jsonl.gz"
    gz.write_bytes(gzip.compress(src.corpus.read_bytes()))
    reader = RerankReader(RerankSources(src.queries, gz, src.candidates))
    with pytest.raises(InputError, match="gunzip -k"):
        read_all(reader)


def test_gzipped_queries_and_run_are_read(tmp_path):
    src = beir(tmp_path, "q1 Q0 d1 1 1 t\n")
    qz, rz = tmp_path / "queries.jsonl.gz", tmp_path / "run.trec.gz"
    qz.write_bytes(gzip.compress(src.queries.read_bytes()))
    rz.write_bytes(gzip.compress(src.candidates.read_bytes()))
    rows, rejects = read_all(RerankReader(RerankSources(qz, src.corpus, rz)))
    assert [(r["qid"], r["doc_id"]) for r in rows] == [("q1", "d1")] and rejects == []


def test_corpus_index_duplicates_cache_and_unreadable_lines(tmp_path):
    lines = [json.dumps(o, ensure_ascii=False).encode() for o in CORPUS]
    lines += [b'{"_id": "d1", "text": "second d1"}', b'not json', b'{"text": "x", "_id": 7}',
              b'{"_id": "d8", "text": "cut',  # looks fine to the fast id scan, unreadable when read
              b'{"title": "t", "_id": "late"}']
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    cache = tmp_path / "cache"
    index = CorpusIndex.open(path, cache)
    assert len(index) == 9 and index.stats.duplicate_ids == 1 and index.stats.unreadable_lines == 1
    assert index.stats.first_unreadable.startswith("line 7: malformed JSON")
    assert index.stats.first_duplicate == "line 6: id 'd1'"
    texts, problems = index.texts(["d1", "7", "late", "nope", "é 5", "d8"])
    assert texts[:5] == ["Paris Paris is the capital of France.", "x", "t", None, "spaced   out"]
    assert texts[5] is None and problems[5].startswith("malformed JSON")
    index.close()
    assert len(list(cache.iterdir())) == 1
    again = CorpusIndex.open(path, cache)  # from the cache: same arrays
    assert np.array_equal(again.keys, index.keys) and np.array_equal(again.offsets, index.offsets)
    assert again.stats == index.stats
    path.write_bytes(path.read_bytes() + b'{"_id": "new", "text": "n"}\n')  # changed file: rebuilt
    assert CorpusIndex.open(path, cache).texts(["new"])[0] == ["n"]


def test_load_queries_keeps_only_the_wanted_ones(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", QUERIES + [{"_id": "q1", "text": "again"}], b"[1]\n")
    queries, stats = load_queries(path, {"q1", "q3", "zz"})
    assert queries == {"q1": "capital of france", "q3": "unused"}
    assert (stats.entries, stats.duplicate_ids, stats.unreadable_lines) == (4, 1, 1)
