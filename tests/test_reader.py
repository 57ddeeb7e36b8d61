"""Tests for pipeline.reader.

Every fixture is written into a temporary folder by plain writers here (csv/json/pyarrow), and
read back through `DatasetReader`. The invariants checked throughout: each input record is
either accepted or rejected exactly once, with its global row index and its physical line; a
file-level problem is an InputError naming the file and the line or column at fault.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.reader import (
    ColumnMap,
    DatasetReader,
    InputError,
    Reject,
    detect_format,
    list_input_files,
)

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


# --------------------------------------------------------------------------- writers


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


# --------------------------------------------------------------------------- reading


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


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name, first_line", [
    ("d.tsv", 2), ("d.csv", 2), ("d.jsonl", 1), ("d.ndjson", 1), ("d.parquet", 1),
    ("d.tsv.gz", 2), ("d.csv.gz", 2), ("d.jsonl.gz", 1),
])
def test_every_format_reads_back_the_same_rows(tmp_path, name, first_line):
    path = write(tmp_path / name, ROWS, TEXT_COLUMNS)
    rows, rejects, reader = read_all([path])
    assert rejects == []
    assert texts(rows) == expected(ROWS)
    assert [r["row"] for r in rows] == list(range(len(ROWS)))
    assert [r["line"] for r in rows] == list(range(first_line, first_line + len(ROWS)))
    assert reader.has_label and not reader.pretokenized
    assert reader.counts[str(path)].rows_read == len(ROWS)


def test_tsv_quotes_are_literal(tmp_path):
    """An unbalanced quote in TSV is text, not the start of a field that swallows lines."""
    path = write_bytes(tmp_path / "q.tsv", TSV_HEADER + b'q1\t"open quote\td1\tdoc\t1\nq2\tq\td2\t"x"\t0\n')
    rows, rejects, _ = read_all([path])
    assert rejects == []
    assert [(r["query"], r["doc"]) for r in rows] == [('"open quote', "doc"), ("q", '"x"')]


def test_csv_record_spanning_lines_reports_its_start_line(tmp_path):
    data = 'qid,query,doc_id,doc\nq1,"multi\nline, query",d1,"doc ""one"""\nq2,plain,d2,"a\n\nb"\nq3,x,d3,y\n'
    path = write_bytes(tmp_path / "m.csv", data.encode())
    rows, rejects, reader = read_all([path])
    assert rejects == []
    assert [(r["line"], r["query"], r["doc"]) for r in rows] == [
        (2, "multi\nline, query", 'doc "one"'), (4, "plain", "a\n\nb"), (7, "x", "y")]
    assert not reader.has_label


def test_csv_reads_a_one_megabyte_field(tmp_path):
    big = "w" * (1 << 20)
    path = write(tmp_path / "big.csv", [{"qid": "q", "query": "x", "doc_id": "d", "doc": big, "label": 1}])
    rows, rejects, _ = read_all([path])
    assert rejects == [] and rows[0]["doc"] == big


def test_crlf_line_endings_and_utf8_bom_are_ignored(tmp_path):
    tsv = write_bytes(tmp_path / "b.tsv", b"\xef\xbb\xbf" + TSV_HEADER.replace(b"\n", b"\r\n") + b"q\tx\td\ty\t1\r\n")
    csv_ = write_bytes(tmp_path / "b.csv", b"\xef\xbb\xbfqid,query,doc_id,doc\r\nq,x,e,y\r\n")
    jsonl = write_bytes(tmp_path / "b.jsonl", b'\xef\xbb\xbf{"qid": "q", "query": "x", "doc_id": "f", "doc": "y"}\r\n')
    rows, rejects, _ = read_all([tsv, csv_, jsonl])
    assert rejects == []
    assert [(r["doc_id"], r["doc"], r["line"]) for r in rows] == [("d", "y", 2), ("e", "y", 2), ("f", "y", 1)]


def test_ids_are_stripped_texts_are_not(tmp_path):
    path = write_bytes(tmp_path / "s.tsv", TSV_HEADER + b" q1 \t  query  \td1 \t doc \t 1 \n")
    rows, rejects, _ = read_all([path])
    assert rejects == []
    assert texts(rows) == [("q1", "  query  ", "d1", " doc ", 1.0)]


def test_chunking_keeps_rows_in_order_and_chunks_small(tmp_path):
    path = write(tmp_path / "c.tsv", ROWS, TEXT_COLUMNS)
    whole, _, _ = read_all([path])
    reader = DatasetReader([path], chunk_rows=2)
    sizes = [len(chunk) for chunk, _ in reader.chunks()]
    assert sizes == [2, 2, 1]
    small, _, _ = read_all([path], chunk_rows=2)
    assert small == whole


def test_a_batch_of_only_rejects_yields_no_chunk(tmp_path):
    path = write_bytes(tmp_path / "r.tsv", TSV_HEADER + b"bad\nbad\nq\tx\td\ty\t1\n")
    pairs = list(DatasetReader([path], chunk_rows=2).chunks())
    assert [(chunk is None, len(rej)) for chunk, rej in pairs] == [(True, 2), (False, 0)]


def test_row_indices_continue_across_files_and_lines_restart(tmp_path):
    a = write(tmp_path / "a.tsv", ROWS[:3], TEXT_COLUMNS)
    b = write(tmp_path / "b.jsonl", ROWS[3:], TEXT_COLUMNS)
    rows, _, reader = read_all([a, b], chunk_rows=2)
    assert [(r["file"], r["row"], r["line"]) for r in rows] == [
        (str(a), 0, 2), (str(a), 1, 3), (str(a), 2, 4), (str(b), 3, 1), (str(b), 4, 2)]
    assert {k: v.rows_read for k, v in reader.counts.items()} == {str(a): 3, str(b): 2}


def test_reading_twice_starts_afresh(tmp_path):
    path = write(tmp_path / "t.tsv", ROWS, TEXT_COLUMNS)
    reader = DatasetReader([path])
    first = [list(c.row) for c, _ in reader.chunks()]
    second = [list(c.row) for c, _ in reader.chunks()]
    assert first == second == [list(range(len(ROWS)))]
    assert reader.counts[str(path)].rows_read == len(ROWS)


def test_label_column_is_optional_per_file(tmp_path):
    labelled = write(tmp_path / "a.tsv", ROWS[:2], TEXT_COLUMNS)
    unlabelled = write(tmp_path / "b.tsv", ROWS[2:], TEXT_COLUMNS[:4])
    rows, _, reader = read_all([labelled, unlabelled])
    assert reader.has_label
    assert [r["label"] for r in rows[:2]] == [2.0, 0.5]
    assert all(math.isnan(r["label"]) for r in rows[2:])
    _, _, reader = read_all([unlabelled])
    assert not reader.has_label
    assert next(reader.chunks())[0].label is None


def test_extra_columns_are_ignored_and_columns_can_be_remapped(tmp_path):
    rows = [{"extra": "e", "id": "q1", "question": "x", "pid": "p", "passage": "y", "rel": 1}]
    path = write(tmp_path / "r.csv", rows)
    cols = ColumnMap(qid="id", query="question", doc_id="pid", doc="passage", label="rel")
    got, rejects, _ = read_all([path], columns=cols)
    assert rejects == [] and texts(got) == [("q1", "x", "p", "y", 1.0)]


def test_json_numbers_as_ids_become_integer_strings(tmp_path):
    path = write_bytes(tmp_path / "n.jsonl", b'{"qid": 17, "query": "x", "doc_id": 3.0, "doc": "y", "label": 1}\n'
                                             b'{"qid": 1.5, "query": "x", "doc_id": 4, "doc": "y", "label": 1}\n')
    rows, rejects, _ = read_all([path])
    assert [(r["qid"], r["doc_id"]) for r in rows] == [("17", "3")]
    assert [(r.line, r.reason) for r in rejects] == [(2, "field 'qid' must be a string or an integer, got 1.5")]


def test_parquet_integer_ids_and_row_numbers(tmp_path):
    path = tmp_path / "i.parquet"
    pq.write_table(pa.table({"qid": [7, 8], "query": ["x", "x"], "doc_id": [1, 2], "doc": ["a", "b"],
                             "label": [1, 0]}), path)
    rows, rejects, _ = read_all([path])
    assert rejects == []
    assert [(r["qid"], r["doc_id"], r["line"], r["label"]) for r in rows] == [("7", "1", 1, 1.0), ("8", "2", 2, 0.0)]


# --------------------------------------------------------------------------- listing files


def test_list_input_files_expands_folders_sorted_and_keeps_given_order(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.tsv", "a.csv.gz", "sub/c.jsonl", "sub/d.parquet", "notes.txt", "e.json", "f.parquet.gz"):
        (folder / name).write_bytes(b"x")
    single = write_bytes(tmp_path / "z.ndjson", b"x")
    got = list_input_files([single, folder, folder / "b.tsv"])
    assert got == [single, folder / "a.csv.gz", folder / "b.tsv", folder / "sub" / "c.jsonl",
                   folder / "sub" / "d.parquet"]


@pytest.mark.parametrize("name, fmt", [
    ("x.tsv", "tsv"), ("x.TSV", "tsv"), ("x.csv.gz", "csv"), ("x.jsonl", "jsonl"), ("x.ndjson.gz", "jsonl"),
    ("x.parquet", "parquet"), ("dir.v1/x.tsv.gz", "tsv"),
])
def test_detect_format(name, fmt):
    assert detect_format(name) == fmt


@pytest.mark.parametrize("name", ["x.json", "x.txt", "x.parquet.gz", "x.gz", "tsv"])
def test_detect_format_refuses_other_suffixes(name):
    with pytest.raises(InputError, match="unsupported file type"):
        detect_format(name)


def test_list_input_files_errors(tmp_path):
    with pytest.raises(InputError, match="nothere.tsv: no such file"):
        list_input_files([tmp_path / "nothere.tsv"])
    with pytest.raises(InputError, match=r"notes\.txt: unsupported file type"):
        list_input_files([write_bytes(tmp_path / "notes.txt", b"x")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_bytes(b"x")
    with pytest.raises(InputError, match="no input files found in .*empty"):
        list_input_files([tmp_path / "empty"])


# --------------------------------------------------------------------------- file-level errors

GOOD_TSV = TSV_HEADER + b"q\tx\td\ty\t1\n"


def _gzip_cut_short(path: Path) -> Path:
    """A gzip file whose compressed stream ends in the middle of the data."""
    data = TSV_HEADER + b"".join(b"q%d\tquery\td%d\tdoc %d\t1\n" % (i, i, i * 7919) for i in range(20000))
    packed = gzip.compress(data)
    return write_bytes(path, packed[: len(packed) // 2])


FILE_ERRORS = {
    "empty.tsv": (b"", ["empty.tsv", "empty file (0 bytes)"]),
    "empty.jsonl": (b"\n \n", ["empty.jsonl", "empty file"]),
    "bom.csv": (b"\xef\xbb\xbf", ["bom.csv", "empty file"]),
    "header.tsv": (TSV_HEADER + b"\n\n", ["header.tsv", "no data rows"]),
    "header.csv": (b"qid,query,doc_id,doc\n", ["header.csv", "no data rows"]),
    "cols.tsv": (b"qid\tquestion\tdoc_id\tdoc\nq\tx\td\ty\n",
                 ["cols.tsv", "line 1", "missing required column 'query'", "'question'", "--col-query"]),
    "cols.csv": (b"id,query,pid,doc\nq,x,d,y\n",
                 ["cols.csv", "line 1", "'qid', 'doc_id'", "--col-qid NAME, --col-doc-id NAME", "'pid'"]),
    "cols.jsonl": (b'not json\n{"qid": "q", "query": "x", "doc_id": "d"}\n',
                   ["cols.jsonl", "line 2 (first JSON object)", "'doc'", "--col-doc"]),
    "twice.tsv": (b"qid\tquery\tdoc_id\tdoc\tdoc\nq\tx\td\ty\tz\n", ["twice.tsv", "line 1", "'doc' appears 2 times"]),
    "undecodable.tsv": (b"qid\tqu\xffery\tdoc_id\tdoc\nq\tx\td\ty\n", ["undecodable.tsv", "line 1 (header)", "UTF-8"]),
    "undecodable.csv": (b"qid,qu\xffery,doc_id,doc\nq,x,d,y\n", ["undecodable.csv", "line 1 (header)", "UTF-8"]),
    "array.jsonl": (b'[{"qid": "q"},\n 1]\n', ["array.jsonl", "no line holds a JSON object", "line 1"]),
    "plain.tsv.gz": (GOOD_TSV, ["plain.tsv.gz", "not a gzip file"]),
    "garbage.parquet": (b"this is not parquet", ["garbage.parquet", "not a readable Parquet file"]),
}


@pytest.mark.parametrize("name", sorted(FILE_ERRORS))
def test_file_level_problems_raise_input_error(tmp_path, name):
    data, needles = FILE_ERRORS[name]
    path = write_bytes(tmp_path / name, data)
    with pytest.raises(InputError) as info:
        DatasetReader([path])
    for needle in needles:
        assert needle in str(info.value)


def test_parquet_without_rows_is_empty(tmp_path):
    path = tmp_path / "none.parquet"
    pq.write_table(pa.table({c: pa.array([], pa.string()) for c in TEXT_COLUMNS}), path)
    with pytest.raises(InputError, match=r"none\.parquet: no data rows"):
        DatasetReader([path])


def test_gzip_cut_short_fails_the_read_with_file_and_line(tmp_path):
    path = _gzip_cut_short(tmp_path / "cut.tsv.gz")
    reader = DatasetReader([path])  # the start of the file is fine
    with pytest.raises(InputError, match=r"cut\.tsv\.gz: cannot read past line \d+"):
        for _ in reader.chunks():
            pass


def test_all_files_must_be_of_one_kind(tmp_path):
    text = write(tmp_path / "a.tsv", ROWS, TEXT_COLUMNS)
    tok = write(tmp_path / "b.jsonl", [{"qid": "q", "doc_id": "d", "input_ids": [1, 2], "token_type_ids": [0, 0]}])
    with pytest.raises(InputError) as info:
        DatasetReader([text, tok])
    message = str(info.value)
    assert "b.jsonl" in message and "'query'" in message and "one kind" in message and "a.tsv" in message


def test_forcing_pretokenized_on_text_input_names_the_missing_columns(tmp_path):
    text = write(tmp_path / "a.tsv", ROWS, TEXT_COLUMNS)
    with pytest.raises(InputError, match="'input_ids', 'token_type_ids' for pre-tokenized input"):
        DatasetReader([text], pretokenized=True)


def test_a_later_bad_file_fails_before_any_row_is_read(tmp_path):
    good = write(tmp_path / "a.tsv", ROWS, TEXT_COLUMNS)
    empty = write_bytes(tmp_path / "b.tsv", b"")
    with pytest.raises(InputError, match=r"b\.tsv: empty file"):
        DatasetReader([good, empty])


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
    (b"q10\tquery\td10\tdoc\t", "empty label"),
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
    assert [(r["line"], r["row"], r["qid"], r["doc_id"], r["label"]) for r in rows] == [
        (2, 0, "q1", "d1", 1.0), (16, 13, "q1", "d2", 2.5)]
    by_line = {r.line: r for r in rejects}
    assert (by_line[10].qid, by_line[10].doc_id, by_line[10].row) == ("q9", "d9", 8)
    assert by_line[3].qid == ""  # unknown when the fields do not line up
    assert reader.counts[str(path)].rows_read == 14 and reader.counts[str(path)].rows_rejected == 12


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
    assert got[13] == "missing field 'label'"
    assert got[14].startswith("malformed JSON")
    assert got[15] == "NUL byte in field 'doc'"
    assert sorted(got) == [3, 4, 5, 6, 7, 8, 9, 11, 13, 14, 15]
    assert [(r["line"], r["doc_id"], r["query"]) for r in rows] == [(1, "d", "x"), (10, "d9", "x"),
                                                                   (12, "d11", "\U0001f600")]


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
                                        4: "empty id in field 'doc_id'", 5: "empty text in field 'doc'",
                                        6: "missing field 'label'"}
    assert [(r["line"], r["doc"]) for r in rows] == [(1, "y")]


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

TOKENIZED = [
    {"qid": "q1", "doc_id": "d1", "input_ids": [101, 2054, 102, 7, 102], "token_type_ids": [0, 0, 0, 1, 1],
     "label": 1},
    {"qid": "q1", "doc_id": "d2", "input_ids": [101, 102, 9, 102], "token_type_ids": [0, 0, 1, 1], "label": 0},
]
TOKENIZED_COLUMNS = ["qid", "doc_id", "input_ids", "token_type_ids", "label"]


@pytest.mark.parametrize("name", ["t.jsonl", "t.tsv", "t.csv", "t.parquet", "t.jsonl.gz"])
def test_pretokenized_rows_in_every_format(tmp_path, name):
    path = write(tmp_path / name, TOKENIZED, TOKENIZED_COLUMNS)
    rows, rejects, reader = read_all([path])
    assert rejects == [] and reader.pretokenized
    assert [(r["qid"], r["doc_id"], r["input_ids"], r["token_type_ids"], r["label"]) for r in rows] == [
        (t["qid"], t["doc_id"], t["input_ids"], t["token_type_ids"], float(t["label"])) for t in TOKENIZED]
    assert "query" not in rows[0]


def test_pretokenized_tsv_accepts_space_separated_ids(tmp_path):
    path = write_bytes(tmp_path / "s.tsv", b"qid\tdoc_id\tinput_ids\ttoken_type_ids\nq\td\t101 7  102\t0 0 0\n")
    rows, rejects, reader = read_all([path])
    assert rejects == [] and not reader.has_label
    assert (rows[0]["input_ids"], rows[0]["token_type_ids"]) == ([101, 7, 102], [0, 0, 0])


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


def test_seen_pairs_finds_first_occurrences_across_merges(monkeypatch):
    import numpy as np

    from pipeline.reader import SeenPairs

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
