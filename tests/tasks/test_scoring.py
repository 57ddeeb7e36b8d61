"""The task registry and the scoring tasks' plain-numpy parts: how a chunk becomes a request, and
how a window's scores become the committed table and its rejects."""

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.io.reader import Chunk, Reject
from pipeline.tasks import TASKS, get_task
from pipeline.tasks.scoring import SCORED_SCHEMA, scored_output


def _chunk(file="f.tsv", n=3, pretokenized=False):
    return Chunk(file=file, row=np.arange(n, dtype=np.int64) + 10, line=np.arange(n, dtype=np.int64) + 2,
                 qid=[f"q{i // 2}" for i in range(n)], doc_id=[f"d{i}" for i in range(n)],
                 query=None if pretokenized else [f"query {i // 2}" for i in range(n)],
                 doc=None if pretokenized else ["same doc", "other doc", "same doc"][:n],
                 label=np.arange(n, dtype=np.float64),
                 input_ids=[[101, 7, 102]] * n if pretokenized else None,
                 token_type_ids=[[0, 0, 0]] * n if pretokenized else None)


def test_registry_names_the_tasks_and_refuses_others():
    assert set(TASKS) == {"cross", "bi", "generate"}
    assert get_task("cross").model_output == "score" and get_task("bi").model_output == "embedding"
    assert get_task("generate").model_output == "tokens"
    with pytest.raises(ConfigError, match="unknown task 'summarize'"):
        get_task("summarize")


def test_cross_requests_pairs_or_pretokenized_ids():
    item = get_task("cross").prepare(_chunk(), [], 64)
    assert item.request.kind == "pairs" and item.request.a == ["query 0", "query 0", "query 1"]
    item = get_task("cross").prepare(_chunk(pretokenized=True), [], 64)
    assert item.request.kind == "pretokenized" and item.request.b == [[0, 0, 0]] * 3


def test_bi_requests_each_distinct_text_once_with_every_rows_slots():
    item = get_task("bi").prepare(_chunk(), [], 64)
    texts = item.request.a
    assert item.request.kind == "texts" and texts == ["query 0", "query 1", "same doc", "other doc"]
    q_idx, d_idx = item.extra
    assert [texts[i] for i in q_idx] == ["query 0", "query 0", "query 1"]
    assert [texts[i] for i in d_idx] == ["same doc", "other doc", "same doc"]


def test_tasks_name_the_input_they_take_and_bi_refuses_pretokenized_pairs():
    from pipeline.tasks import check_input

    class Reader:
        pretokenized = True

    assert get_task("cross").input_kinds == ("text", "pretokenized") and get_task("bi").input_kinds == ("text",)
    check_input(get_task("cross"), Reader())
    with pytest.raises(ConfigError, match="task 'bi' does not take; only --mode cross can score them"):
        check_input(get_task("bi"), Reader())


def test_scored_output_keeps_scored_rows_and_rejects_the_others_in_row_order():
    task = get_task("cross")
    a, b = _chunk("a.tsv"), _chunk("b.tsv", n=2)
    items = [task.prepare(a, [Reject("a.tsv", 1, 9, "bad label")], 64), task.prepare(b, [], 64)]
    scores = [np.array([0.5, np.nan, -1.0]), np.array([2.0, 3.0])]
    table, rejects, per_file = scored_output(items, scores, [{1: "tokenizer error: boom"}, {}],
                                             {"a.tsv": 0, "b.tsv": 1})
    assert table.schema == SCORED_SCHEMA
    assert table.column("row").to_pylist() == [10, 12, 10, 11]
    assert table.column("file").to_pylist() == [0, 0, 1, 1]
    assert table.column("score").to_pylist() == [0.5, -1.0, 2.0, 3.0]
    assert table.column("doc_id").to_pylist() == ["d0", "d2", "d0", "d1"]
    assert [(r.row, r.reason) for r in rejects] == [(9, "bad label"), (11, "tokenizer error: boom")]
    assert rejects[1].line == 3 and rejects[1].qid == "q0" and per_file == {"a.tsv": 2, "b.tsv": 2}
