"""Tests for pipeline.io.formats, through `DatasetReader`: each format's reading, file listing,
and file-level problems (an InputError naming the file and the line or column at fault)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.reader import DatasetReader, InputError, TsvQuoting, detect_format, list_input_files
from tests.io.helpers import ROWS, TEXT_COLUMNS, TSV_HEADER, expected, read_all, texts, write, write_bytes


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
    # ROWS hold quotes written raw ('what is "ernie", really?'): auto reads the TSV literally
    want = {str(path): TsvQuoting("none", "auto: 3 fields with literal quotes (first at line 2: a quote inside "
                                          "a field's text), no CSV-quoted field")}
    assert reader.quoting == (want if name.startswith("d.tsv") else {})


def test_tsv_quotes_are_literal(tmp_path):
    """An unbalanced quote in raw TSV is text, not the start of a field that swallows lines
    (tests/io/test_tsv_quoting.py has the CSV-quoted TSV files)."""
    path = write_bytes(tmp_path / "q.tsv", TSV_HEADER + b'q1\t"open quote\td1\tdoc\t1\nq2\tq\td2\t"x"\t0\n')
    rows, rejects, reader = read_all([path])
    assert rejects == []
    assert [(r["query"], r["doc"]) for r in rows] == [('"open quote', "doc"), ("q", '"x"')]
    assert reader.quoting[str(path)].mode == "none"


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
    reader = DatasetReader([path], tsv_quoting="none")  # the start of the file is fine
    with pytest.raises(InputError, match=r"cut\.tsv\.gz: cannot read past line \d+"):
        for _ in reader.chunks():
            pass


def test_gzip_cut_short_fails_the_auto_quoting_scan_before_any_row(tmp_path):
    """--tsv-quoting auto reads the whole file when the reader is built, so the run stops there."""
    path = _gzip_cut_short(tmp_path / "cut.tsv.gz")
    with pytest.raises(InputError, match=r"cut\.tsv\.gz: cannot read the whole file \(scanning it for --tsv-quoting auto\)"):
        DatasetReader([path])
