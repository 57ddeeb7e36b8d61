"""TSV quoting (`tsv_quoting` / `--tsv-quoting auto|csv|none`, pipeline/io/formats.py).

TSV files written by pandas `to_csv(sep="\\t")` or `csv.writer(delimiter="\\t")` quote fields that
hold a quote, a tab or a line break; raw TSV dumps (MS MARCO's collection.tsv) hold quotes as
text. Each kind must read back exactly what was written, `auto` must tell them apart by the
stated rule (or refuse, naming the lines), and the readers must say per file what they did.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.io import formats
from pipeline.io.formats import TSV_QUOTING, decide_tsv_quoting, inspect_file, scan_tsv_quotes
from pipeline.io.prompts import PromptReader
from pipeline.io.reader import DatasetReader, InputError, TsvQuoting
from tests.io.helpers import read_all, write_bytes

COLUMNS = ["qid", "query", "doc_id", "doc", "label"]

# Documents holding everything that makes csv.writer / pandas quote a field, and text that must
# not be touched.
DOCS = [
    "plain text",
    'he said "hi" and left',
    '"Hello" he said',
    "a\ttab inside",
    "first line\nsecond line",
    'ends with a quote: "x"',
    '"',
    "two\n\nbreaks",
    "after the breaks",
]


def frame(docs=DOCS) -> pd.DataFrame:
    return pd.DataFrame({"qid": [f"q{i // 3}" for i in range(len(docs))],
                         "query": ['what is "it"?' if i % 2 else "query" for i in range(len(docs))],
                         "doc_id": [f"d{i}" for i in range(len(docs))],
                         "doc": docs,
                         "label": [i % 3 for i in range(len(docs))]})


def expected(df: pd.DataFrame) -> list[tuple]:
    return [(r.qid, r.query, r.doc_id, r.doc, float(r.label)) for r in df.itertuples()]


def got(rows: list[dict]) -> list[tuple]:
    return [(r["qid"], r["query"], r["doc_id"], r["doc"], r["label"]) for r in rows]


def start_lines(df: pd.DataFrame) -> list[int]:
    """Physical line where each record starts: line 1 is the header; a record takes one line
    plus one per line break inside its fields."""
    lines, line = [], 2
    for r in df.itertuples():
        lines.append(line)
        line += 1 + sum(str(v).count("\n") for v in (r.qid, r.query, r.doc_id, r.doc))
    return lines


def write_pandas(path: Path, df: pd.DataFrame, **kwargs) -> Path:
    df.to_csv(path, sep="\t", index=False, **kwargs)  # .gz: pandas compresses
    return path


def write_csv_writer(path: Path, df: pd.DataFrame, **kwargs) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:  # csv.writer's own "\r\n" line ends
        w = csv.writer(f, delimiter="\t", **kwargs)
        w.writerow(df.columns)
        w.writerows(df.values.tolist())
    return path


def write_raw(path: Path, lines: list[str]) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


# MS MARCO style: raw text, tab-separated, quotes anywhere, some unbalanced; passages are
# snippets, so a quote opened in one may be closed at the end of another.
RAW_DOCS = [
    '"Hello" he said, and left.',
    'The "best" one is 5\'10" tall.',
    '"An opening quote never closed in this snippet',
    "a passage without quotes",
    'a snippet that ends in a closing quote."',
    '""',
    'he wrote ""twice""',
    '"Quoted title"',
]


def raw_lines(docs=RAW_DOCS) -> list[str]:
    return ["\t".join(COLUMNS)] + [f"r{i}\tquery {i}\tp{i}\t{d}\t1" for i, d in enumerate(docs)]


# --------------------------------------------------------------------------- CSV-quoted files


@pytest.mark.parametrize("writer", [write_pandas, write_csv_writer])
def test_pandas_and_csv_writer_files_read_back_exactly(tmp_path, writer):
    df = frame()
    path = writer(tmp_path / "w.tsv", df)
    assert '"""Hello"" he said"' in path.read_text()  # the writers did quote and double
    rows, rejects, reader = read_all([path])
    assert rejects == []
    assert got(rows) == expected(df)
    assert reader.quoting[str(path)].mode == "csv"


@pytest.mark.parametrize("writer", [write_pandas, write_csv_writer])
def test_a_record_spanning_lines_is_numbered_by_its_first_line(tmp_path, writer):
    df = frame()
    rows, _, _ = read_all([writer(tmp_path / "w.tsv", df)])
    lines = [r["line"] for r in rows]
    assert lines == start_lines(df)
    # "first line\nsecond line" starts at line 6, the row after it at 8; "two\n\nbreaks" at 10,
    # the row after it at 13
    assert lines[4:6] == [6, 8] and lines[7:9] == [10, 13]


def test_the_same_pandas_file_read_with_none_keeps_the_quotes(tmp_path):
    """What the issue saw: quoted TSV read literally reaches the model with extra quotes."""
    df = frame()
    path = write_pandas(tmp_path / "w.tsv", df)
    rows, rejects, reader = read_all([path], tsv_quoting="none")
    docs = {r["doc_id"]: r["doc"] for r in rows}
    assert docs["d1"] == '"he said ""hi"" and left"' != DOCS[1]
    assert docs["d2"] == '"""Hello"" he said"'
    assert reader.quoting[str(path)] == TsvQuoting("none", "--tsv-quoting none")
    # the tab and the line breaks split records: wrong field counts
    assert {r.line for r in rejects} >= {5, 6, 7}
    assert all("wrong number of fields" in r.reason for r in rejects)


def test_quote_all_files_read_as_csv_because_every_header_field_is_quoted(tmp_path):
    """QUOTE_ALL quotes fields nothing forced to be quoted ("plain"); the header shows it."""
    df = frame(["plain", "also plain"])
    for path in (write_csv_writer(tmp_path / "a.tsv", df, quoting=csv.QUOTE_ALL),
                 write_pandas(tmp_path / "b.tsv", df, quoting=csv.QUOTE_ALL)):
        assert path.read_text().startswith('"qid"\t"query"')
        rows, rejects, reader = read_all([path])
        assert rejects == [] and got(rows) == expected(df)
        assert reader.quoting[str(path)].mode == "csv"
        assert reader.quoting[str(path)].rule.startswith("auto: every field of the header quoted, ")


def test_quote_nonnumeric_file_reads_as_csv(tmp_path):
    df = frame()
    path = write_csv_writer(tmp_path / "n.tsv", df, quoting=csv.QUOTE_NONNUMERIC)
    rows, rejects, reader = read_all([path])
    assert rejects == [] and got(rows) == expected(df)
    assert reader.quoting[str(path)].mode == "csv"


def test_gzipped_files_are_decided_the_same(tmp_path):
    df = frame()
    quoted = write_pandas(tmp_path / "w.tsv.gz", df)
    raw = write_raw(tmp_path / "r.tsv.gz", raw_lines())
    rows, rejects, reader = read_all([quoted])
    assert rejects == [] and got(rows) == expected(df) and [r["line"] for r in rows] == start_lines(df)
    assert reader.quoting[str(quoted)].mode == "csv"
    rows, _, reader = read_all([raw])
    assert [r["doc"] for r in rows] == RAW_DOCS
    assert reader.quoting[str(raw)].mode == "none"


def test_a_quoted_header_spanning_lines_and_crlf(tmp_path):
    path = write_bytes(tmp_path / "h.tsv", b'qid\tquery\tdoc_id\t"doc"\r\nq\t"x\r\ny"\td\t"a ""b"""\r\n')
    rows, rejects, reader = read_all([path])
    assert rejects == [] and reader.quoting[str(path)].mode == "csv"
    assert [(r["line"], r["query"], r["doc"]) for r in rows] == [(2, "x\r\ny", 'a "b"')]


# --------------------------------------------------------------------------- raw TSV


def test_raw_msmarco_style_tsv_reads_literally_and_as_before(tmp_path):
    path = write_raw(tmp_path / "collection.tsv", raw_lines())
    rows, rejects, reader = read_all([path])
    assert rejects == []
    assert [r["doc"] for r in rows] == RAW_DOCS
    assert [r["line"] for r in rows] == list(range(2, 2 + len(RAW_DOCS)))
    assert reader.quoting[str(path)].mode == "none"
    assert reader.quoting[str(path)].rule.startswith("auto: ")
    assert read_all([path], tsv_quoting="none")[:2] == (rows, rejects)
    # csv would have mangled it: quotes dropped, records merged, rejects
    csv_rows, csv_rejects, _ = read_all([path], tsv_quoting="csv")
    assert [r["doc"] for r in csv_rows] != RAW_DOCS and csv_rejects


def test_quotes_pairing_up_by_accident_across_raw_lines_are_literal(tmp_path):
    """An opening quote in one passage and a closing one at the end of a later passage, with no
    quote between, split as csv.reader splits would form one well-formed field over three lines;
    every line being a whole record of the header's width shows it is raw text."""
    docs = ['"opening, never closed', "nothing here", 'closing at the end."']
    path = write_raw(tmp_path / "m.tsv", ["pid\tpassage"] + [f"{i}\t{d}" for i, d in enumerate(docs)])
    rows, rejects, reader = read_all([path], columns=_pid_passage())
    assert rejects == [] and [r["doc"] for r in rows] == docs
    assert "pairing up by accident" in reader.quoting[str(path)].rule
    # and within one line, across columns: a record of another width
    path = write_raw(tmp_path / "c.tsv", raw_lines(['x'])[:1] + ['q\t"what is\td\tsome doc"\t1'])
    rows, _, reader = read_all([path])
    assert (rows[0]["query"], rows[0]["doc"]) == ('"what is', 'some doc"')
    assert "a record of 3 fields, not 5" in reader.quoting[str(path)].rule


def test_a_real_multi_line_field_is_csv_even_when_its_first_and_last_lines_look_whole(tmp_path):
    """Only the middle line (no quote in it, skipped by the fast path) shows that the lines are
    not whole literal records, so the scan must check the lines it skips inside a field."""
    docs = ["para one\npara two\nlast\tline", "plain"]
    path = write_pandas(tmp_path / "p.tsv", pd.DataFrame({"pid": ["1", "2"], "passage": docs}))
    assert path.read_text().splitlines()[1:4] == ['1\t"para one', "para two", 'last\tline"']
    rows, rejects, reader = read_all([path], columns=_pid_passage())
    assert rejects == [] and [(r["line"], r["doc"]) for r in rows] == [(2, docs[0]), (5, "plain")]
    assert reader.quoting[str(path)].rule == ("auto: 1 CSV-quoted field (first at line 2: a line break), "
                                              "no literal quotes")


def _pid_passage():
    from pipeline.io.reader import ColumnMap
    return ColumnMap(qid="pid", query="passage", doc_id="pid", doc="passage")


def test_neutral_quoted_fields_alone_keep_their_quotes(tmp_path):
    """`"Hello"` with nothing inside that needs quoting: a QUOTE_ALL writer's output or raw text
    that is exactly a quotation. With nothing else to go by it reads literally, as before, and
    the rule text says so."""
    path = write_raw(tmp_path / "n.tsv", raw_lines(['"Hello"', '"To be or not to be"', "x"]))
    rows, _, reader = read_all([path])
    assert [r["doc"] for r in rows] == ['"Hello"', '"To be or not to be"', "x"]
    assert reader.quoting[str(path)] == TsvQuoting(
        "none", "auto: no CSV-quoted field and no literal quotes; 2 fields wrapped in quotes with nothing that "
                "needed quoting (first at line 2) keep their quotes (pass --tsv-quoting csv if a writer added them)")
    rows, _, _ = read_all([path], tsv_quoting="csv")
    assert [r["doc"] for r in rows] == ["Hello", "To be or not to be", "x"]


def test_neutral_fields_beside_csv_evidence_read_as_csv(tmp_path):
    path = write_raw(tmp_path / "n.tsv", raw_lines(['"Hello"', '"say ""hi"""']))
    rows, _, reader = read_all([path])
    assert [r["doc"] for r in rows] == ["Hello", 'say "hi"']
    assert reader.quoting[str(path)].mode == "csv"


# --------------------------------------------------------------------------- auto: both kinds


def test_both_kinds_of_evidence_raise_naming_both_lines(tmp_path):
    path = write_raw(tmp_path / "mixed.tsv", raw_lines(["plain", 'say "hi"', "x", '"a ""quoted"" doc"']))
    with pytest.raises(InputError) as info:
        DatasetReader([path])
    message = str(info.value)
    assert "mixed.tsv" in message
    assert "line 5 is CSV-quoted (a doubled quote)" in message
    assert "line 3 holds quotes that are text (a quote inside a field's text)" in message
    assert "--tsv-quoting csv" in message and "--tsv-quoting none" in message
    with pytest.raises(InputError, match="mixed.tsv: cannot tell"):
        PromptReader([path], columns=_id_prompt())


def test_the_decision_does_not_depend_on_where_the_evidence_sits(tmp_path, monkeypatch):
    """Evidence far from the start (here past many scan blocks) counts like evidence at line 2."""
    monkeypatch.setattr(formats, "_SCAN_BLOCK", 64)
    filler = [f"q{i}\tquery\td{i}\tfiller text number {i}\t0" for i in range(2000)]
    late_csv = write_raw(tmp_path / "c.tsv", raw_lines([])[:1] + filler + ['q\tx\td\t"a ""b"""\t1'])
    assert decide_tsv_quoting(late_csv) == ("csv", "auto: 1 CSV-quoted field (first at line 2002: a doubled "
                                                   "quote), no literal quotes")
    late_literal = write_raw(tmp_path / "l.tsv", raw_lines(['"a ""b"""'])[:2] + filler + ['q\tx\td\tsay "hi"\t1'])
    with pytest.raises(InputError, match="line 2 is CSV-quoted .* line 2003 holds quotes that are text"):
        decide_tsv_quoting(late_literal)


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64, 1 << 23])
def test_scan_blocks_of_any_size_find_the_same_evidence(tmp_path, monkeypatch, block):
    """The scan reads in blocks; a line or a quoted field cut by a block edge changes nothing."""
    paths = [write_pandas(tmp_path / "p.tsv", frame()), write_raw(tmp_path / "r.tsv", raw_lines())]
    want = [scan_tsv_quotes(p) for p in paths]
    monkeypatch.setattr(formats, "_SCAN_BLOCK", block)
    assert [scan_tsv_quotes(p) for p in paths] == want
    # 7 documents and the 4 queries 'what is "it"?'
    assert (want[0].csv_fields, want[0].csv_line, want[0].literal_fields) == (11, 3, 0)
    # lines 2, 3, 4 (its opening quote pairs up with the closing one of line 6) and 8
    assert (want[1].csv_fields, want[1].literal_fields, want[1].literal_line) == (0, 4, 2)
    assert (want[1].neutral_fields, want[1].neutral_line) == (2, 7)


# --------------------------------------------------------------------------- explicit modes


def test_explicit_modes_override_auto(tmp_path):
    path = write_raw(tmp_path / "mixed.tsv", raw_lines(["the \"best\" one", '"a ""b"""', '"Hello" he said', "z"]))
    rows, rejects, reader = read_all([path], tsv_quoting="none")
    assert [r["doc"] for r in rows] == ["the \"best\" one", '"a ""b"""', '"Hello" he said', "z"]
    assert reader.quoting[str(path)].rule == "--tsv-quoting none"
    rows, rejects, reader = read_all([path], tsv_quoting="csv")
    assert [(r["line"], r["doc"]) for r in rows] == [(2, "the \"best\" one"), (3, 'a "b"'), (5, "z")]
    # csv mode is strict: a quote followed by text rejects its record, not the file
    assert [(r.line, r.reason) for r in rejects] == [(4, "malformed CSV-quoted TSV: '\\t' expected after '\"'")]
    assert reader.quoting[str(path)] == TsvQuoting("csv", "--tsv-quoting csv")


def test_csv_mode_rejects_records_not_files(tmp_path):
    data = (b"qid\tquery\tdoc_id\tdoc\n"
            b'q1\tx\td1\t"bad \xff bytes"\n'
            b'q2\tx\td2\t"two\nlines"\textra\n'
            b'q3\tx\td3\t"good"\n'
            b'q4\tx\td4\t"never closed\n'
            b"q5\tx\td5\ty\n")
    path = write_bytes(tmp_path / "bad.tsv", data)
    rows, rejects, _ = read_all([path], tsv_quoting="csv")
    assert [(r["line"], r["doc"]) for r in rows] == [(5, "good")]
    assert [(r.line, r.reason.split(":")[0]) for r in rejects] == [
        (2, "undecodable bytes (utf-8)"), (3, "wrong number of fields"), (6, "malformed CSV-quoted TSV")]
    assert "unexpected end of data" in rejects[-1].reason


def test_a_bad_csv_header_is_an_input_error(tmp_path):
    path = write_bytes(tmp_path / "h.tsv", b'qid\t"query" x\tdoc_id\tdoc\nq\tx\td\ty\n')
    with pytest.raises(InputError, match=r"h\.tsv: line 1 \(header\) is not valid CSV-quoted TSV: '\\t' expected"):
        DatasetReader([path], tsv_quoting="csv")
    layout = inspect_file(path)  # auto: the quote is text
    assert (layout.tsv_quoting, layout.columns[1]) == ("none", '"query" x')


@pytest.mark.parametrize("bad", ["CSV", "quoted", "", None])
def test_other_values_are_refused_naming_the_allowed_ones(tmp_path, bad):
    path = write_raw(tmp_path / "r.tsv", raw_lines())
    for build in (lambda: DatasetReader([path], tsv_quoting=bad),
                  lambda: PromptReader([path], tsv_quoting=bad),
                  lambda: inspect_file(path, bad)):
        with pytest.raises(ValueError, match="tsv_quoting must be one of auto, csv, none"):
            build()
    assert TSV_QUOTING == ("auto", "csv", "none")


# --------------------------------------------------------------------------- rule text and readers


def test_rule_texts(tmp_path):
    assert decide_tsv_quoting(write_pandas(tmp_path / "p.tsv", frame())) == (
        "csv", "auto: 11 CSV-quoted fields (first at line 3: a doubled quote), no literal quotes")
    assert decide_tsv_quoting(write_raw(tmp_path / "r.tsv", raw_lines())) == (
        "none", "auto: 4 fields with literal quotes (first at line 2: a closing quote followed by text), "
                "no CSV-quoted field")
    assert decide_tsv_quoting(write_raw(tmp_path / "x.tsv", raw_lines(["x"]))) == (
        "none", "auto: no field holds a quote")
    assert decide_tsv_quoting(write_raw(tmp_path / "u.tsv", raw_lines(["fine", '"never closed']))) == (
        "none", "auto: 1 field with literal quotes (first at line 3: an opening quote never closed), "
                "no CSV-quoted field")
    assert decide_tsv_quoting(tmp_path / "u.tsv", "csv") == ("csv", "--tsv-quoting csv")


def test_dataset_reader_reports_quoting_per_tsv_file(tmp_path):
    df = frame()
    quoted = write_pandas(tmp_path / "a.tsv", df)
    raw = write_raw(tmp_path / "b.tsv", raw_lines())
    other = tmp_path / "c.jsonl"
    other.write_text(json.dumps({"qid": "z", "query": "x", "doc_id": "d", "doc": 'a "b"', "label": 1}) + "\n")
    rows, rejects, reader = read_all([quoted, raw, other])
    assert rejects == []
    assert got(rows[:len(df)]) == expected(df)
    assert [r["doc"] for r in rows[len(df):]] == RAW_DOCS + ['a "b"']
    assert set(reader.quoting) == {str(quoted), str(raw)}
    assert reader.quoting[str(quoted)].mode == "csv" and reader.quoting[str(raw)].mode == "none"
    assert reader._layouts[2].tsv_quoting is None


def _id_prompt():
    from pipeline.io.reader import ColumnMap
    return ColumnMap(id="qid", prompt="doc")


def test_prompt_reader_reads_pandas_written_prompts_and_messages(tmp_path):
    turns = [{"role": "system", "content": 'Answer "yes" or "no".'}, {"role": "user", "content": "Tab\there?\nOK"}]
    prompts = pd.DataFrame({"id": ["a", "b", "c"],
                            "prompt": ['Say "hi"', "two\nlines", "plain"],
                            "reference": ['["x, \\"y\\"", "z"]', "hi", ""]})
    p = write_pandas(tmp_path / "p.tsv", prompts)
    m = write_pandas(tmp_path / "m.tsv", pd.DataFrame({"id": ["t"], "messages": [json.dumps(turns)]}))
    reader = PromptReader([p])
    got_rows = [(c.id, c.prompt, c.reference, list(c.line)) for c, _ in reader.chunks()]
    assert got_rows == [(["a", "b", "c"], ['Say "hi"', "two\nlines", "plain"], [('x, "y"', "z"), ("hi",), ()],
                         [2, 3, 5])]
    assert reader.quoting == {str(p): TsvQuoting("csv", "auto: 3 CSV-quoted fields (first at line 2: a doubled "
                                                         "quote), no literal quotes")}
    chunk, rejects = next(PromptReader([m]).chunks())
    assert rejects == [] and chunk.messages == [turns]
    literal, _ = next(PromptReader([p], tsv_quoting="none").chunks())
    assert literal is None or literal.prompt != ['Say "hi"', "two\nlines", "plain"]


SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "pairs.tsv"


@pytest.mark.skipif(not SAMPLE.is_file(), reason="data/sample/pairs.tsv not present")
def test_the_sample_rewritten_by_pandas_reads_exactly_like_the_raw_sample(tmp_path):
    """The repository's sample is a raw TSV with quotes in about a tenth of its rows; pandas
    rewrites those rows quoted. Both files must give the same rows, lines and all."""
    df = pd.read_csv(SAMPLE, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)
    quoted = write_pandas(tmp_path / "pairs.tsv", df)
    raw_rows, raw_rejects, raw_reader = read_all([SAMPLE])
    rows, rejects, reader = read_all([quoted])
    assert raw_reader.quoting[str(SAMPLE)].mode == "none" and reader.quoting[str(quoted)].mode == "csv"
    strip = [{k: v for k, v in r.items() if k != "file"} for r in rows]
    assert strip == [{k: v for k, v in r.items() if k != "file"} for r in raw_rows]
    assert rejects == raw_rejects == []
    literal, _, _ = read_all([quoted], tsv_quoting="none")
    assert sum(a["doc"] != b["doc"] for a, b in zip(literal, raw_rows)) > len(raw_rows) // 20


def test_inspect_file_and_read_records_agree_when_given_nothing(tmp_path):
    """A caller that passes no quoting to either (e.g. another reader built on them) reads rows
    the way the header was read."""
    path = write_pandas(tmp_path / "p.tsv", frame())
    layout = inspect_file(path)
    wanted = ["qid", "doc_id", "query", "doc"]
    default = list(formats.read_records(path, layout.fmt, wanted, 100))
    assert default == list(formats.read_records(path, layout.fmt, wanted, 100, layout.tsv_quoting))
    assert [values[3] for _, values in default] == DOCS
    literal = list(formats.read_records(path, layout.fmt, wanted, 100, "none"))
    assert [values for _, values in literal if type(values) is tuple][1][3] == '"he said ""hi"" and left"'
    with pytest.raises(ValueError, match="one of auto, csv, none"):
        formats.read_records(path, layout.fmt, wanted, 100, "quoted")


def test_literal_quotes_are_counted_per_field(tmp_path):
    path = write_raw(tmp_path / "t.tsv", raw_lines()[:1] + ['q\tsay "a"\td\tand "b" too\t1', 'q\tx\te\tone "c"\t1'])
    ev = scan_tsv_quotes(path)
    assert (ev.literal_fields, ev.literal_line, ev.csv_fields, ev.neutral_fields) == (3, 2, 0, 0)
