"""Tests for pipeline.io.reader: chunks, row indices and counts across files, column mapping,
and the checks that make all files of one run one kind of input."""

from __future__ import annotations

import math

import pytest

from pipeline.io.reader import ColumnMap, DatasetReader, InputError
from tests.io.helpers import ROWS, TEXT_COLUMNS, TSV_HEADER, read_all, texts, write, write_bytes


# --------------------------------------------------------------------------- chunks and files


def test_chunking_keeps_rows_in_order_and_chunks_small(tmp_path):
    path = write(tmp_path / "c.tsv", ROWS, TEXT_COLUMNS)
    whole, _, _ = read_all([path])
    reader = DatasetReader([path], chunk_rows=2)
    sizes = [len(chunk) for chunk, _ in reader.chunks()]
    assert sizes == [2, 2, 1]
    small, _, _ = read_all([path], chunk_rows=2)
    assert small == whole


def test_chunks_cut_between_multi_line_records_of_a_csv_quoted_tsv(tmp_path):
    data = (TSV_HEADER + b'q1\t"two\nlines"\td1\t"a ""b"""\t1\nq1\tx\td2\t"three\n\nlines"\t0\n'
            b"q2\tx\td3\ty\t1\n")
    path = write_bytes(tmp_path / "m.tsv", data)
    whole, rejects, reader = read_all([path])
    assert rejects == [] and reader.tsv_quoting == "auto" and reader.quoting[str(path)].mode == "csv"
    assert [(r["line"], r["query"], r["doc"]) for r in whole] == [
        (2, "two\nlines", 'a "b"'), (4, "x", "three\n\nlines"), (7, "x", "y")]
    for size in (1, 2):
        assert read_all([path], chunk_rows=size)[0] == whole
    assert [len(c) for c, _ in DatasetReader([path], chunk_rows=2).chunks()] == [2, 1]


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


# --------------------------------------------------------------------------- kinds of input


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
