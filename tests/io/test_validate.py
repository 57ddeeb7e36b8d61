"""Tests for pipeline.io.validate: row-level rejects with their line and reason, duplicates
(and their stable keys), pre-tokenized ids, and arbitrary lines that must never crash the read."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.io.reader import InputError
from tests.io.helpers import (
    ROWS,
    TEXT_COLUMNS,
    TSV_HEADER,
    read_all,
    reasons_by_line,
    texts,
    write,
    write_bytes,
)


# --------------------------------------------------------------------------- values


def test_ids_are_stripped_texts_are_not(tmp_path):
    path = write_bytes(tmp_path / "s.tsv", TSV_HEADER + b" q1 \t  query  \td1 \t doc \t 1 \n")
    rows, rejects, _ = read_all([path])
    assert rejects == []
    assert texts(rows) == [("q1", "  query  ", "d1", " doc ", 1.0)]


def test_ids_with_a_tab_or_line_break_are_rejected_spaces_are_kept(tmp_path):
    rows_in = [{"qid": "q 1", "query": "x", "doc_id": "d 1", "doc": "y"},
               {"qid": "q\t2", "query": "x", "doc_id": "d", "doc": "y"},
               {"qid": "q3", "query": "x", "doc_id": "d\n3", "doc": "y"},
               {"qid": "q4", "query": "x", "doc_id": "d\r4", "doc": "y"}]
    path = write_bytes(tmp_path / "ids.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in rows_in))
    rows, rejects, _ = read_all([path])
    assert [(r["qid"], r["doc_id"]) for r in rows] == [("q 1", "d 1")]
    assert reasons_by_line(rejects) == {
        2: "field 'qid' holds a tab or a line break, which the TSV outputs cannot hold",
        3: "field 'doc_id' holds a tab or a line break, which the TSV outputs cannot hold",
        4: "field 'doc_id' holds a tab or a line break, which the TSV outputs cannot hold"}


def test_empty_and_missing_labels_are_unjudged_not_rejected(tmp_path):
    tsv = write_bytes(tmp_path / "u.tsv", TSV_HEADER + b"q1\tx\td1\ty\t\nq1\tx\td2\ty\t  \nq1\tx\td3\ty\t1\n")
    rows, rejects, _ = read_all([tsv])
    assert rejects == []
    assert [r["doc_id"] for r in rows] == ["d1", "d2", "d3"]
    assert [math.isnan(r["label"]) for r in rows] == [True, True, False]
    absent = write_bytes(tmp_path / "u.jsonl", b'{"qid": "q", "query": "x", "doc_id": "a", "doc": "y", "label": 2}\n'
                                                b'{"qid": "q", "query": "x", "doc_id": "b", "doc": "y"}\n')
    rows, rejects, _ = read_all([absent])
    assert rejects == [] and rows[0]["label"] == 2.0 and math.isnan(rows[1]["label"])


# --------------------------------------------------------------------------- row-level rejects


TSV_BAD_LINES = [
    # (line bytes, reason substring or None when accepted); line numbers start at 2.
    (b"q1\tquery\td1\tdoc\t1", None),
    (b"q2\tquery\td2", "wrong number of fields: expected 5, got 3"),
    (b"q3\tqu\xffery\td3\tdoc\t1", "undecodable bytes (utf-8)"),
    (b"q4\tque\x00ry\td4\tdoc\t1", "NUL byte in field 'query'"),
    (b" \tquery\td5\tdoc\t1", "empty id in field 'qid'"),
    (b"q6\tquery\t\tdoc\t1", "empty id in field 'doc_id'"),
    (b"q7\tquery\td7\t \t 1", "empty text in field 'doc'"),
    (b"q8\t\td8\tdoc\t1", "empty text in field 'query'"),
    (b"q9\tquery\td9\tdoc\tabc", "label 'abc' is not a number"),
    (b"q10\tquery\td10\tdoc\t", None),  # an empty label: unjudged, kept with label NaN
    (b"q11\tquery\td11\tdoc\tinf", "label 'inf' is not a finite number"),
    (b"q12\tquery\td12\tdoc\tnan", "label 'nan' is not a finite number"),
    (b" q1 \tother\td1\tother\t0", "duplicate (qid, doc_id) = ('q1', 'd1'), first seen at {file}:2"),
    (b"", None),  # blank: a line, not a row
    (b"q1\tquery\td2\tdoc\t2.5", None),
]


def test_tsv_row_level_problems_are_rejected_with_line_and_reason(tmp_path):
    path = write_bytes(tmp_path / "bad.tsv", TSV_HEADER + b"\n".join(line for line, _ in TSV_BAD_LINES) + b"\n")
    rows, rejects, reader = read_all([path], chunk_rows=3)
    want = {n: reason.format(file=path) for n, (_, reason) in enumerate(TSV_BAD_LINES, 2) if reason}
    got = reasons_by_line(rejects)
    assert sorted(got) == sorted(want)
    for line, reason in want.items():
        assert reason in got[line], (line, got[line])
    got_rows = [(r["line"], r["row"], r["qid"], r["doc_id"], r["label"]) for r in rows]
    assert got_rows[0] == (2, 0, "q1", "d1", 1.0) and got_rows[2] == (16, 13, "q1", "d2", 2.5)
    assert got_rows[1][:4] == (11, 9, "q10", "d10") and math.isnan(got_rows[1][4])
    by_line = {r.line: r for r in rejects}
    assert (by_line[10].qid, by_line[10].doc_id, by_line[10].row) == ("q9", "d9", 8)
    assert by_line[3].qid == ""  # unknown when the fields do not line up
    assert reader.counts[str(path)].rows_read == 14 and reader.counts[str(path)].rows_rejected == 11


def test_csv_row_level_problems(tmp_path):
    data = (b"qid,query,doc_id,doc\n"
            b"q1,x,d1,y\n"
            b"q2,x,d2\n"  # line 3: too few fields
            b'q3,"two\nlines \xff",d3,y\n'  # lines 4-5: undecodable inside a multi-line record
            b"q4,a\rb,d4,y\n"  # line 6: bare CR in an unquoted field
            b"q5,x,d5,y,extra\n"  # line 7
            b"q6,x,d6,\x00\n"  # line 8
            b"q7,x,d7,y\n")  # line 9
    path = write_bytes(tmp_path / "bad.csv", data)
    rows, rejects, _ = read_all([path])
    got = reasons_by_line(rejects)
    assert sorted(got) == [3, 4, 6, 7, 8]
    assert got[3] == "wrong number of fields: expected 4, got 3"
    assert got[4] == "undecodable bytes (utf-8)"
    assert got[6].startswith("malformed CSV")
    assert got[7] == "wrong number of fields: expected 4, got 5"
    assert got[8] == "NUL byte in field 'doc'"
    assert [(r["line"], r["qid"]) for r in rows] == [(2, "q1"), (9, "q7")]


def test_jsonl_row_level_problems(tmp_path):
    good = {"qid": "q", "query": "x", "doc_id": "d", "doc": "y", "label": 1}
    lines = [
        json.dumps(good).encode(),  # 1
        b"",  # 2: blank, skipped but counted as a line
        b'{"qid": "q", "query": "x",',  # 3
        b"[1, 2]",  # 4
        b'{"qid": "q2", "query": "\xff", "doc_id": "d", "doc": "y", "label": 1}',  # 5
        json.dumps({**good, "qid": None}).encode(),  # 6
        json.dumps({k: v for k, v in good.items() if k != "doc_id"}).encode(),  # 7
        json.dumps({**good, "doc_id": "d7", "doc": 5}).encode(),  # 8
        json.dumps({**good, "doc_id": "d8", "label": True}).encode(),  # 9
        json.dumps({**good, "doc_id": "d9", "label": "2"}).encode(),  # 10: a numeric string is a number
        b'{"qid": "q", "query": "\\ud800", "doc_id": "d10", "doc": "y", "label": 1}',  # 11
        b'{"qid": "q", "query": "\\ud83d\\ude00", "doc_id": "d11", "doc": "y", "label": 1}',  # 12: a real pair
        json.dumps({**good, "doc_id": "d12", "label": None}).encode(),  # 13
        b"[[[[[[[[[[[[[[[[[[[[" * 10000,  # 14
        json.dumps({**good, "doc_id": "d14", "doc": "a\u0000b"}).encode(),  # 15
    ]
    path = write_bytes(tmp_path / "bad.jsonl", b"\n".join(lines) + b"\n")
    rows, rejects, _ = read_all([path])
    got = reasons_by_line(rejects)
    assert got[3].startswith("malformed JSON")
    assert got[4] == "JSON line is not an object (got an array)"
    assert got[5].startswith("undecodable bytes (utf-8)")
    assert got[6] == "missing field 'qid'"
    assert got[7] == "missing field 'doc_id'"
    assert got[8] == "field 'doc' must be text, got 5"
    assert got[9] == "label True is not a number"
    assert "lone surrogate" in got[11]
    assert got[14].startswith("malformed JSON")
    assert got[15] == "NUL byte in field 'doc'"
    assert sorted(got) == [3, 4, 5, 6, 7, 8, 9, 11, 14, 15]
    assert [(r["line"], r["doc_id"], r["query"]) for r in rows] == [(1, "d", "x"), (10, "d9", "x"),
                                                                   (12, "d11", "\U0001f600"), (13, "d12", "x")]
    assert math.isnan(rows[-1]["label"])  # JSON null: unjudged


def test_parquet_row_level_problems(tmp_path):
    path = tmp_path / "bad.parquet"
    table = pa.table({
        "qid": ["q1", None, "q3", "q4", "q5", "q6"],
        "query": ["x", "x", "x", "x", "x", "x"],
        "doc_id": ["d1", "d2", "d3", " ", "d5", "d6"],
        "doc": pa.array([b"y", b"y", b"\xff", b"y", b"  ", b"y"], pa.binary()),
        "label": [1.0, 1.0, 1.0, 1.0, 1.0, None],
    })
    pq.write_table(table, path)
    rows, rejects, _ = read_all([path], chunk_rows=4)
    assert reasons_by_line(rejects) == {2: "missing field 'qid'", 3: "undecodable bytes (utf-8)",
                                        4: "empty id in field 'doc_id'", 5: "empty text in field 'doc'"}
    assert [(r["line"], r["doc"]) for r in rows] == [(1, "y"), (6, "y")]
    assert math.isnan(rows[1]["label"])  # a Parquet null label: unjudged


def test_duplicates_across_files_keep_the_first(tmp_path):
    a = write(tmp_path / "a.tsv", ROWS, TEXT_COLUMNS)
    b = write(tmp_path / "b.jsonl", [ROWS[0], {**ROWS[4], "doc_id": "new"}, ROWS[3]], TEXT_COLUMNS)
    rows, rejects, _ = read_all([a, b])
    assert [(r.file, r.line, r.row, r.reason) for r in rejects] == [
        (str(b), 1, 5, f"duplicate (qid, doc_id) = ('q1', 'd1'), first seen at {a}:2"),
        (str(b), 3, 7, f"duplicate (qid, doc_id) = ('q3', '17'), first seen at {a}:5"),
    ]
    assert [r["doc_id"] for r in rows[-1:]] == ["new"]


def test_a_rejected_row_does_not_claim_its_pair(tmp_path):
    """A pair first seen in a rejected row is not a duplicate when it comes back valid."""
    path = write_bytes(tmp_path / "p.tsv", TSV_HEADER + b"q\tx\td\t \t1\nq\tx\td\ty\t1\n")
    rows, rejects, _ = read_all([path])
    assert [r.line for r in rejects] == [2] and [r["line"] for r in rows] == [3]


# --------------------------------------------------------------------------- pre-tokenized


def test_pretokenized_row_level_problems(tmp_path):
    lines = [
        ("1 2 3", "0 0 0", None),
        ("1 -2 3", "0 0 0", "field 'input_ids' is not a list of non-negative integers"),
        ("[1, 2.5]", "[0, 0]", "field 'input_ids' is not a list of non-negative integers"),
        ("[1, 2", "[0, 0]", "field 'input_ids' is not a list of non-negative integers"),
        ("1 2 3", "0 0", "token_type_ids has 2 ids but input_ids has 3"),
        ("", "", "empty input_ids"),
        ("[]", "[]", "empty input_ids"),
        ("1 2", "a b", "field 'token_type_ids' is not a list of non-negative integers"),
        ("9" * 5000, "0", "field 'input_ids' is not a list of non-negative integers"),
        (str(2**63), "0", "field 'input_ids' is not a list of non-negative integers"),
    ]
    body = "".join(f"q\td{i}\t{ids}\t{types}\n" for i, (ids, types, _) in enumerate(lines))
    path = write_bytes(tmp_path / "t.tsv", b"qid\tdoc_id\tinput_ids\ttoken_type_ids\n" + body.encode())
    rows, rejects, _ = read_all([path])
    got = reasons_by_line(rejects)
    want = {i + 2: reason for i, (_, _, reason) in enumerate(lines) if reason}
    assert sorted(got) == sorted(want)
    for line, reason in want.items():
        assert got[line].startswith(reason), (line, got[line])
    assert [r["line"] for r in rows] == [2]


def test_pretokenized_parquet_rejects_nulls_in_lists(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"qid": ["q", "q"], "doc_id": ["a", "b"],
                             "input_ids": pa.array([[1, None], [1, 2]], pa.list_(pa.int32())),
                             "token_type_ids": pa.array([[0, 0], None], pa.list_(pa.int8()))}), path)
    _, rejects, _ = read_all([path])
    assert [(r.line, r.reason.split(":")[0]) for r in rejects] == [
        (1, "field 'input_ids' is not a list of non-negative integers"), (2, "missing field 'token_type_ids'")]


# --------------------------------------------------------------------------- property


PIECES = ["q1", "q2", "d1", "d2", "", " ", "x", "1", "0.5", "abc", "nan", '"', '""', ",", "\t", "\r",
          "\x00", "[1, 2]", "{", "}", ":", "\\ud800", "é", "\ufeff"]


_cells = st.lists(st.sampled_from(PIECES), max_size=4).map("".join)


_text_line = st.lists(_cells, min_size=1, max_size=7).flatmap(
    lambda cells: st.sampled_from(["\t", ","]).map(lambda sep: sep.join(cells).encode("utf-8", "surrogatepass")))


_json_line = st.dictionaries(st.sampled_from(TEXT_COLUMNS + ["other"]),
                             st.one_of(st.none(), st.booleans(), st.integers(-5, 10**20), st.floats(),
                                       _cells, st.lists(st.integers(-1, 5), max_size=3)),
                             max_size=6).map(lambda d: json.dumps(d).encode())


_line = st.one_of(st.binary(max_size=30), _text_line, _json_line)


HEADERS = {"tsv": TSV_HEADER, "csv": b"qid,query,doc_id,doc,label\n",
           "jsonl": json.dumps(dict(zip(TEXT_COLUMNS, ["q0", "x", "d0", "y", 1]))).encode() + b"\n"}


@settings(max_examples=50, deadline=None)
@given(fmt=st.sampled_from(sorted(HEADERS)), lines=st.lists(_line, max_size=12), chunk_rows=st.integers(1, 4))
def test_arbitrary_lines_are_accepted_or_rejected_never_crash(fmt, lines, chunk_rows):
    data = HEADERS[fmt] + b"\n".join(lines)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_bytes(Path(tmp) / f"p.{fmt}", data)
        try:
            rows, rejects, reader = read_all([path], chunk_rows=chunk_rows)  # checks the accounting
        except InputError as e:
            assert str(path) in str(e)
            return
    for r in rows:
        assert r["qid"] and r["qid"] == r["qid"].strip() and "\x00" not in r["qid"] + r["doc_id"]
        assert r["query"].strip() and r["doc"].strip() and math.isfinite(r["label"])
        (r["qid"] + r["doc_id"] + r["query"] + r["doc"]).encode("utf-8")  # no lone surrogates
    assert len({(r["qid"], r["doc_id"]) for r in rows}) == len(rows)
    lines_seen = sorted([r["line"] for r in rows] + [r.line for r in rejects])
    assert len(set(lines_seen)) == len(lines_seen) and all(1 <= n <= data.count(b"\n") + 1 for n in lines_seen)


# --------------------------------------------------------------------------- duplicates


def test_seen_pairs_finds_first_occurrences_across_merges(monkeypatch):
    import numpy as np

    from pipeline.io.reader import SeenPairs

    monkeypatch.setattr(SeenPairs, "RECENT_LIMIT", 7)
    rng = np.random.default_rng(0)
    seen, reference = SeenPairs(), {}
    for batch in range(40):
        keys = rng.integers(0, 300, 13).astype(np.int64)
        where = np.arange(batch * 13, batch * 13 + 13, dtype=np.int64)
        got = seen.first_seen(keys, where)
        want = []
        for k, w in zip(keys.tolist(), where.tolist()):
            first = reference.setdefault(k, w)
            want.append(-1 if first == w else first)
        assert got.tolist() == want
    assert len(seen) == len(reference)


# The pairs whose keys are compared across processes: ASCII, non-ASCII, numbers-as-ids, long ids.
KEY_PAIRS = [("q1", "d1"), ("q1", "d2"), ("d1", "q1"), ("ab", "c"), ("a", "bc"), ("查询 1", "doc-é"),
             ("17", "3"), ("q" * 300, "d" * 1000), ("\U0001f600", "\t x \t")]


def _keys_and_salted_hashes(pairs):
    """Run in a spawned process: pair_key of each pair, and Python's (salted) hash of the same
    string, which the test uses to show that the two processes do have different hash seeds."""
    from pipeline.io.validate import pair_key

    return [pair_key(q, d) for q, d in pairs], [hash(f"{q}\x00{d}") for q, d in pairs]


def test_pair_key_is_the_same_in_a_spawned_process(monkeypatch):
    import multiprocessing
    import os

    from pipeline.io.reader import pair_key

    # The child gets a hash seed the parent cannot have, so `hash` would disagree there.
    monkeypatch.setenv("PYTHONHASHSEED", "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        theirs, their_hashes = pool.apply(_keys_and_salted_hashes, (KEY_PAIRS,))
    ours = [pair_key(q, d) for q, d in KEY_PAIRS]
    assert theirs == ours
    assert their_hashes != [hash(f"{q}\x00{d}") for q, d in KEY_PAIRS]  # the seeds did differ


def test_pair_key_is_pinned_and_pair_keys_agree_with_it():
    """The key is part of the interface between processes and runs: a change here is a change of
    format (keys written by one version would not match keys from the next)."""
    import numpy as np

    from pipeline.io.reader import pair_key, pair_keys

    assert pair_key("q1", "d1") == -1567662153533080308
    assert pair_key("查询 1", "doc-é") == 7087683931039601887
    keys = pair_keys([q for q, _ in KEY_PAIRS], [d for _, d in KEY_PAIRS])
    assert keys.dtype == np.int64 and keys.tolist() == [pair_key(q, d) for q, d in KEY_PAIRS]
    assert len(set(keys.tolist())) == len(KEY_PAIRS)  # ("ab", "c") and ("a", "bc") differ
    assert pair_keys([], []).tolist() == []


def test_duplicates_are_found_by_pair_key(tmp_path, monkeypatch):
    """Two different pairs with one key are reported as duplicates (the documented 2^-64 risk),
    which shows the reader compares keys, not Python's per-process hash."""
    import pipeline.io.validate as validate

    real = validate.pair_keys
    monkeypatch.setattr(validate, "pair_keys", lambda qids, doc_ids: real(["same"] * len(qids), ["key"] * len(qids)))
    a = write(tmp_path / "a.tsv", ROWS[:2], TEXT_COLUMNS)
    rows, rejects, _ = read_all([a])
    assert [r["line"] for r in rows] == [2]
    assert [(r.line, r.reason) for r in rejects] == [
        (3, f"duplicate (qid, doc_id) = ('q1', 'd2'), first seen at {a}:2")]
