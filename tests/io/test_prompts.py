"""The generation input reader (pipeline/io/prompts.py): PromptReader, parse_messages, parse_reference.

Small files are written here in every format (plus the hand-written fixtures in
tests/fixtures/generate); every record must end accepted or rejected exactly once, with its
file, line, global row and id, and the per-file counts must say so.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.prompts import PromptReader, parse_messages, parse_reference
from pipeline.io.rows import ColumnMap, InputError, RowError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "generate"


def read_all(reader: PromptReader):
    """(accepted rows, rejects); accepted rows as dicts. Checks the accounting invariant."""
    rows, rejects = [], []
    for chunk, rej in reader.chunks():
        rejects.extend(rej)
        if chunk is None:
            continue
        assert len(chunk) == len(chunk.row) == len(chunk.line) == len(chunk.reference)
        texts = chunk.prompt if chunk.prompt is not None else chunk.messages
        assert (chunk.prompt is None) != (chunk.messages is None)
        assert len(texts) == len(chunk)
        for i in range(len(chunk)):
            rows.append({"file": chunk.file, "row": int(chunk.row[i]), "line": int(chunk.line[i]),
                         "id": chunk.id[i], "text": texts[i], "reference": chunk.reference[i]})
    # each global row exactly once, accepted or rejected
    all_rows = sorted([r["row"] for r in rows] + [r.row for r in rejects])
    assert all_rows == list(range(len(all_rows)))
    for name, count in reader.counts.items():
        acc = sum(1 for r in rows if r["file"] == name)
        rej = sum(1 for r in rejects if r.file == name)
        assert count.rows_read == acc + rej, (name, count, acc, rej)
        assert count.rows_rejected == rej
    return rows, rejects


def write_jsonl(path: Path, objs) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for o in objs:
            f.write((o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)) + "\n")
    return path


def write_tsv(path: Path, header, rows) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(r) + "\n")
    return path


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def turn(content, role="user"):
    return {"role": role, "content": content}


# ----------------------------------------------------------------------------- parse_messages


def test_parse_messages_json_string_and_native_list():
    turns = [turn("be brief", "system"), turn("hi")]
    assert parse_messages(json.dumps(turns), "messages") == turns
    assert parse_messages(turns, "messages") == turns
    # extra keys are dropped, only role and content kept
    assert parse_messages([{"role": "user", "content": "x", "name": "n"}], "m") == [turn("x")]


@pytest.mark.parametrize("value,needle", [
    ("", "empty text in field 'm'"),
    ("   ", "empty text"),
    (None, "missing field 'm'"),
    ("not json", "not valid JSON"),
    ("[", "not valid JSON"),
    ("[]", "non-empty JSON list"),
    ([], "non-empty JSON list"),
    ('{"role": "user", "content": "x"}', "non-empty JSON list"),
    (5, "non-empty JSON list"),
    (["hi"], "turn 0: not an object"),
    ([{"content": "x"}], "turn 0: 'role' must be a non-empty string"),
    ([{"role": " ", "content": "x"}], "'role' must be a non-empty string"),
    ([{"role": 3, "content": "x"}], "'role' must be a non-empty string"),
    ([turn("a"), {"role": "user"}], "turn 1: 'content' must be a string"),
    ([{"role": "user", "content": 7}], "'content' must be a string"),
    ([turn("a\x00b")], "NUL byte"),
    ([{"role": "us\x00er", "content": "x"}], "NUL byte"),
    ([turn("a"), turn("  ")], "the last turn's content is empty"),
])
def test_parse_messages_rejects(value, needle):
    with pytest.raises(RowError) as e:
        parse_messages(value, "m")
    assert needle in e.value.reason


def test_parse_messages_empty_content_allowed_before_the_last_turn():
    turns = [turn("", "system"), turn("q")]
    assert parse_messages(turns, "m") == turns


# ----------------------------------------------------------------------------- parse_reference


@pytest.mark.parametrize("value,want", [
    ("red", ("red",)),
    ("  red  ", ("  red  ",)),
    ('["a", "b"]', ("a", "b")),
    (' ["a"]', ("a",)),
    (["a", "b"], ("a", "b")),
    (["a", ""], ("a",)),
    ("", ()),
    ("  ", ()),
    (None, ()),
    (float("nan"), ()),
    ("[]", ()),
    ([], ()),
    ('{"a": 1}', ('{"a": 1}',)),  # only a cell starting with '[' is read as JSON
])
def test_parse_reference(value, want):
    assert parse_reference(value, "reference") == want


@pytest.mark.parametrize("value,needle", [
    ("[not json", "starts with '[' but is not a JSON list"),
    ('["a", 1]', "must be a string or a list of strings"),
    ([1, 2], "must be a string or a list of strings"),
    ({"a": 1}, "must be a string or a list of strings"),
    ('[{"a": 1}]', "must be a string or a list of strings"),
    (5, "must be a string or a list of strings"),
    (["a\x00"], "NUL byte"),
    ("a\x00", "NUL byte"),
])
def test_parse_reference_rejects(value, needle):
    with pytest.raises(RowError) as e:
        parse_reference(value, "reference")
    assert needle in e.value.reason


# ----------------------------------------------------------------------------- the fixtures


def test_bad_prompts_fixture_as_its_readme_says():
    path = FIXTURES / "bad_prompts.jsonl"
    reader = PromptReader([path])
    assert reader.text_field == "messages" and reader.has_label
    rows, rejects = read_all(reader)
    assert [(r["id"], r["line"], r["row"]) for r in rows] == [("g1", 1, 0), ("g5", 5, 4)]
    assert rows[0]["text"] == [turn("Name a primary colour. Answer with one word.")]
    assert rows[0]["reference"] == ("red",)
    assert rows[1]["reference"] == ("a", "b")
    got = {(r.line, r.row, r.qid): r.reason for r in rejects}
    assert [r.line for r in rejects] == [2, 3, 4, 6]
    assert all(r.file == str(path) for r in rejects)
    assert "last turn's content is empty" in got[(2, 1, "g2")]
    assert "not valid JSON" in got[(3, 2, "g3")]
    assert got[(4, 3, "g1")] == f"duplicate id 'g1', first seen at {path}:1"
    assert "malformed JSON" in got[(6, 5, "")]
    c = reader.counts[str(path)]
    assert (c.rows_read, c.rows_rejected) == (6, 4)


def test_prompts_tsv_fixture_as_its_readme_says():
    path = FIXTURES / "prompts.tsv"
    reader = PromptReader([path])
    assert reader.text_field == "prompt" and reader.has_label
    rows, rejects = read_all(reader)
    assert rejects == []
    assert [r["id"] for r in rows] == ["t1", "t2", "t3", "t4", "t5", "t6"]
    assert [r["line"] for r in rows] == [2, 3, 4, 5, 6, 7]
    refs = {r["id"]: r["reference"] for r in rows}
    assert refs["t1"] == ("red",) and refs["t3"] == ("a", "b") and refs["t4"] == ()
    assert refs["t2"] == ("Paris",)
    assert rows[5]["text"] == "Translate to English: grüß dich"
    # its JSON reference ["a", "b"] holds quotes as text: auto reads the file literally
    assert reader.quoting[str(path)].mode == "none"
    assert reader.quoting[str(path)].rule.startswith("auto: 1 field with literal quotes (first at line 4")


# ----------------------------------------------------------------------------- formats


def test_tsv_messages_as_json_strings(tmp_path):
    good = json.dumps([turn("sys", "system"), turn("hello")])
    p = write_tsv(tmp_path / "m.tsv", ["id", "messages"], [
        ["a", good], ["b", "[{\"role\": \"user\"}]"], ["c", "plain text"], ["d", "[]"], ["", good],
    ])
    rows, rejects = read_all(PromptReader([p]))
    assert [(r["id"], r["text"], r["reference"]) for r in rows] == [("a", json.loads(good), ())]
    reasons = {r.line: (r.qid, r.reason) for r in rejects}
    assert set(reasons) == {3, 4, 5, 6}
    assert reasons[3][0] == "b" and "'content' must be a string" in reasons[3][1]
    assert reasons[4][0] == "c" and "not valid JSON" in reasons[4][1]
    assert reasons[5][0] == "d" and "non-empty JSON list" in reasons[5][1]
    assert reasons[6][0] == "" and "empty id" in reasons[6][1]
    assert [r.row for r in rejects] == [1, 2, 3, 4]


def test_csv_prompts_with_quoting_and_references(tmp_path):
    p = write_csv(tmp_path / "p.csv", ["reference", "prompt", "id"], [
        ['["x, y", "z"]', 'say "hi", please', "1"],
        ["", "second", "2"],
        ['[1, 2]', "bad ref", "3"],
        ["r", "   ", "4"],
        ["r", "fourth", "5"],
    ])
    reader = PromptReader([p])
    rows, rejects = read_all(reader)
    assert [(r["id"], r["text"], r["reference"], r["line"]) for r in rows] == [
        ("1", 'say "hi", please', ("x, y", "z"), 2), ("2", "second", (), 3), ("5", "fourth", ("r",), 6)]
    assert [(r.line, r.row, r.qid) for r in rejects] == [(4, 2, "3"), (5, 3, "4")]
    assert "must be a string or a list of strings" in rejects[0].reason
    assert "empty text in field 'prompt'" in rejects[1].reason


def test_jsonl_rejects_every_reason(tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", [
        {"id": "ok", "prompt": "fine", "reference": ["a"]},   # 1 accepted
        {"id": "np", "reference": "x"},                       # 2 missing prompt
        {"id": "e", "prompt": " "},                           # 3 empty prompt
        {"prompt": "no id"},                                  # 4 missing id
        {"id": " ", "prompt": "blank id"},                    # 5 empty id
        {"id": [1], "prompt": "list id"},                     # 6 bad id type
        {"id": "nul", "prompt": "a\x00b"},                    # 7 NUL
        {"id": "ref", "prompt": "p", "reference": 3},         # 8 bad reference
        {"id": "nsl", "prompt": "p", "reference": ["a", 2]},  # 9 non-string list
        "[1, 2]",                                             # 10 not an object
        {"id": 7, "prompt": "int id", "reference": None},     # 11 accepted, id "7"
        {"id": 7.0, "prompt": "dup as float"},                # 12 duplicate of 7
        {"id": "pt", "prompt": 5},                            # 13 prompt not text
    ])
    rows, rejects = read_all(PromptReader([p]))
    assert [(r["id"], r["line"], r["reference"]) for r in rows] == [("ok", 1, ("a",)), ("7", 11, ())]
    by_line = {r.line: r for r in rejects}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13]
    expect = {2: ("np", "missing field 'prompt'"), 3: ("e", "empty text in field 'prompt'"),
              4: ("", "missing field 'id'"), 5: ("", "empty id"), 6: ("", "must be a string or an integer"),
              7: ("nul", "NUL byte"), 8: ("ref", "must be a string or a list of strings"),
              9: ("nsl", "must be a string or a list of strings"), 10: ("", "not an object"),
              12: ("7", f"duplicate id '7', first seen at {p}:11"), 13: ("pt", "must be text")}
    for line, (rid, needle) in expect.items():
        r = by_line[line]
        assert r.file == str(p) and r.row == line - 1 and r.qid == rid, r
        assert needle in r.reason, r


def test_parquet_native_lists_for_messages_and_reference(tmp_path):
    turn_t = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.table({
        "id": pa.array(["p1", "p2", "p3", "p4"]),
        "messages": pa.array([[turn("s", "system"), turn("q1")], [turn("q2")], [], [turn(None)]],
                             type=pa.list_(turn_t)),
        "reference": pa.array([["a", "b"], None, ["c"], ["d"]], type=pa.list_(pa.string())),
    })
    p = tmp_path / "m.parquet"
    pq.write_table(table, p)
    reader = PromptReader([p], chunk_rows=3)
    assert reader.text_field == "messages"
    rows, rejects = read_all(reader)
    assert [(r["id"], r["text"], r["reference"], r["line"]) for r in rows] == [
        ("p1", [turn("s", "system"), turn("q1")], ("a", "b"), 1), ("p2", [turn("q2")], (), 2)]
    assert [(r.line, r.row, r.qid) for r in rejects] == [(3, 2, "p3"), (4, 3, "p4")]
    assert "non-empty JSON list" in rejects[0].reason
    assert "'content' must be a string" in rejects[1].reason


def test_parquet_plain_prompts_with_string_reference(tmp_path):
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["a", "b"], "reference": ['["x", "y"]', None]}), p)
    rows, rejects = read_all(PromptReader([p]))
    assert rejects == []
    assert [(r["id"], r["text"], r["reference"]) for r in rows] == [("1", "a", ("x", "y")), ("2", "b", ())]


# ----------------------------------------------------------------------------- files of a run


def test_duplicate_id_across_files_names_the_first_location(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "prompt": "1"}, {"id": "y", "prompt": "2"}])
    b = write_tsv(tmp_path / "b.tsv", ["id", "prompt"], [["z", "3"], ["y", "4"], ["x", "5"]])
    reader = PromptReader([a, b])
    rows, rejects = read_all(reader)
    assert [(r["file"], r["id"], r["row"]) for r in rows] == [(str(a), "x", 0), (str(a), "y", 1), (str(b), "z", 2)]
    assert [(r.file, r.line, r.row, r.qid, r.reason) for r in rejects] == [
        (str(b), 3, 3, "y", f"duplicate id 'y', first seen at {a}:2"),
        (str(b), 4, 4, "x", f"duplicate id 'x', first seen at {a}:1"),
    ]
    assert (reader.counts[str(a)].rows_read, reader.counts[str(b)].rows_read) == (2, 3)
    assert reader.counts[str(b)].rows_rejected == 2


def test_chunks_can_be_read_twice_with_fresh_counts(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "prompt": "1"}, {"id": "x", "prompt": "2"}])
    reader = PromptReader([a])
    first = read_all(reader)
    second = read_all(reader)
    assert first == second and len(first[1]) == 1
    assert reader.counts[str(a)].rows_read == 2


def test_both_prompt_and_messages_columns_is_an_input_error(tmp_path):
    p = write_jsonl(tmp_path / "both.jsonl", [{"id": "a", "prompt": "x", "messages": [turn("y")]}])
    with pytest.raises(InputError, match="both 'prompt' and 'messages'"):
        PromptReader([p])


@pytest.mark.parametrize("header,missing", [(["prompt"], "'id'"), (["id", "text"], "'prompt'")])
def test_missing_columns_name_the_col_flags(tmp_path, header, missing):
    p = write_tsv(tmp_path / "x.tsv", header, [["v"] * len(header)])
    with pytest.raises(InputError) as e:
        PromptReader([p])
    msg = str(e.value)
    assert f"missing {missing}" in msg
    assert "--col-id" in msg and "--col-prompt" in msg and "--col-messages" in msg
    assert str(p) in msg


def test_files_with_different_text_columns_are_an_input_error(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "prompt": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "2", "messages": [turn("y")]}])
    with pytest.raises(InputError) as e:
        PromptReader([a, b])
    assert str(b) in str(e.value) and "all files must hold the same" in str(e.value)
    with pytest.raises(InputError) as e:
        PromptReader([b, a])
    assert str(a) in str(e.value) and "'messages'" in str(e.value)
    # a later file holding both: the one the first file lacks is an error too
    c = write_jsonl(tmp_path / "c.jsonl", [{"id": "3", "prompt": "x", "messages": [turn("y")]}])
    with pytest.raises(InputError, match="all files of a run must hold the same one"):
        PromptReader([a, c])


def test_duplicate_column_is_an_input_error(tmp_path):
    p = write_tsv(tmp_path / "d.tsv", ["id", "prompt", "prompt"], [["1", "a", "b"]])
    with pytest.raises(InputError, match="appears 2 times"):
        PromptReader([p])


def test_missing_file_and_empty_file_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        PromptReader([tmp_path / "nope.jsonl"])
    (tmp_path / "empty.tsv").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        PromptReader([tmp_path / "empty.tsv"])


def test_column_renaming(tmp_path):
    p = write_tsv(tmp_path / "r.tsv", ["key", "question", "gold", "prompt"],
                  [["k1", "what?", "ans", "ignored"], ["k2", "why?", "", "ignored"]])
    cols = ColumnMap(id="key", prompt="question", reference="gold")
    reader = PromptReader([p], columns=cols)
    assert reader.text_field == "prompt" and reader.has_label
    rows, rejects = read_all(reader)
    assert rejects == []
    assert [(r["id"], r["text"], r["reference"]) for r in rows] == [("k1", "what?", ("ans",)), ("k2", "why?", ())]
    # with the default names the file has no 'id' column
    with pytest.raises(InputError, match="--col-id"):
        PromptReader([p])


def test_renamed_messages_column(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"uid": "u", "chat": [turn("hi")]}])
    reader = PromptReader([p], columns=ColumnMap(id="uid", messages="chat"))
    rows, _ = read_all(reader)
    assert reader.text_field == "messages" and not reader.has_label
    assert rows[0]["id"] == "u" and rows[0]["text"] == [turn("hi")]


def test_has_label_when_any_file_has_a_reference(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "prompt": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "2", "prompt": "y", "reference": "r"}])
    assert not PromptReader([a]).has_label
    reader = PromptReader([a, b])
    assert reader.has_label
    rows, _ = read_all(reader)
    assert [r["reference"] for r in rows] == [(), ("r",)]


# ----------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 7])
def test_chunking_gives_the_same_rows_as_one_chunk(tmp_path, chunk_rows):
    objs = []
    for i in range(11):
        if i % 4 == 3:
            objs.append({"id": f"r{i}", "prompt": " "})  # rejected
        elif i % 5 == 4:
            objs.append({"id": "r0", "prompt": "dup"})  # duplicate
        else:
            objs.append({"id": f"r{i}", "prompt": f"p{i}", "reference": [f"x{i}"]})
    a = write_jsonl(tmp_path / "a.jsonl", objs)
    b = write_tsv(tmp_path / "b.tsv", ["id", "prompt", "reference"],
                  [[f"s{i}", f"q{i}", ""] for i in range(5)] + [["r1", "dup", ""]])
    whole = PromptReader([a, b], chunk_rows=1000)
    chunked = PromptReader([a, b], chunk_rows=chunk_rows)
    n_chunks = sum(1 for _ in chunked.chunks())
    assert n_chunks == -(-11 // chunk_rows) + -(-6 // chunk_rows)
    want, got = read_all(whole), read_all(chunked)
    assert got == want
    assert len(want[0]) + len(want[1]) == 17 and len(want[1]) == 5
    assert {k: (c.rows_read, c.rows_rejected) for k, c in chunked.counts.items()} == {
        k: (c.rows_read, c.rows_rejected) for k, c in whole.counts.items()}
