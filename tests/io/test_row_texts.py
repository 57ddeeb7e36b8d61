"""read_row_texts (pipeline/io/row_texts.py): a second pass of the run's reader finds the wanted
rows' texts as the first pass read them, stops after the last one and leaves the counts alone."""

import json

from pipeline.io.prompts import PromptReader
from pipeline.io.reader import DatasetReader
from pipeline.io.rerank import RerankReader
from pipeline.io.row_texts import MAX_TEXT_CHARS, read_row_texts
from tests.io.test_rerank import beir


def _tsv(path, lines):
    path.write_text("qid\tquery\tdoc_id\tdoc\tlabel\n" + "".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_text_rows_by_global_row_across_files_with_rejects_between(tmp_path):
    a = _tsv(tmp_path / "a.tsv", ["q1\tfirst query\td1\tdoc one\t1", "q1\t\td2\tno query: rejected\t0",
                                  "q1\tfirst query\td3\t" + "x" * (MAX_TEXT_CHARS + 50) + "\t0"])
    b = _tsv(tmp_path / "b.tsv", ["q2\tsecond query\td9\tdoc nine\t2"])
    reader = DatasetReader([a, b], chunk_rows=1)
    seen = {}
    for chunk, _ in reader.chunks():  # the run's pass
        if chunk is not None:
            seen.update({int(r): (chunk.query[i], chunk.doc[i]) for i, r in enumerate(chunk.row)})
    counts = {k: (v.rows_read, v.rows_rejected) for k, v in reader.counts.items()}
    assert counts == {str(a): (3, 1), str(b): (1, 0)}

    got = read_row_texts(reader, [3, 0, 2])
    assert got[0] == {"file": str(a), "line": 2, "query": "first query", "doc": "doc one"}
    assert got[3] == {"file": str(b), "line": 2, "query": "second query", "doc": "doc nine"}
    assert got[2]["doc"] == "x" * MAX_TEXT_CHARS + " ..." and got[2]["line"] == 4
    assert {r: (g["query"], g["doc"]) for r, g in got.items() if r != 2} == {r: seen[r] for r in (0, 3)}
    assert {k: (v.rows_read, v.rows_rejected) for k, v in reader.counts.items()} == counts  # untouched
    assert read_row_texts(reader, []) == {}
    assert 1 not in read_row_texts(reader, [1])  # a rejected row has no text

    class Counting(DatasetReader):  # stops after the last wanted row
        def chunks(self):
            for item in super().chunks():
                self.yielded = getattr(self, "yielded", 0) + 1
                yield item

    early = Counting([a, b], chunk_rows=1)
    assert set(read_row_texts(early, [0])) == {0} and early.yielded == 1


def test_rerank_rows_carry_the_joined_texts(tmp_path):
    run = "q1 Q0 d1 1 3.0 bm25\nq1 Q0 d3 2 2.0 bm25\nq2 Q0 d2 1 7 bm25\n"
    reader = RerankReader(beir(tmp_path, run))
    got = read_row_texts(reader, [1, 2])
    assert got[1] == {"file": str(tmp_path / "run.trec"), "line": 2, "query": "capital of france",
                      "doc": 'Rome, the "eternal" city.'}
    assert got[2]["query"] == "german city" and got[2]["doc"] == "Berlin is in Germany."


def test_prompt_rows_plain_and_chat(tmp_path):
    plain = tmp_path / "p.jsonl"
    plain.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"prompt {i}"}) + "\n" for i in range(3)))
    assert read_row_texts(PromptReader([plain]), [2]) == {2: {"file": str(plain), "line": 3, "prompt": "prompt 2"}}
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"id": "c", "messages": [{"role": "system", "content": "be brief"},
                                                        {"role": "user", "content": "hi"}]}) + "\n")
    assert read_row_texts(PromptReader([chat]), [0])[0]["prompt"] == "system: be brief\nuser: hi"
