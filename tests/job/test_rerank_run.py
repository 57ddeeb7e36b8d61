"""The reranking layouts, qrels, unjudged rows, TSV quoting and run.trec ids end to end through
the CLI, as a user runs them (tiny random model, the embedded data/rerank sample)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytrec_eval

from pipeline.cli import main
from pipeline.config import REPO_ROOT, ConfigError, RunConfig, resolve
from pipeline.engine.modeldir import load_model_info
from tests.sample_data import sample_rows, write_tsv

RERANK = REPO_ROOT / "data" / "rerank"
BEIR = ["--queries", str(RERANK / "queries.jsonl"), "--corpus", str(RERANK / "corpus.jsonl"),
        "--candidates", str(RERANK / "bm25.trec")]
FAST = ["--no-progress", "--workers", "0", "--threads", "1", "--streams", "1"]


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _qrels(path: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for line in path.read_text().splitlines()[1:]:
        q, d, r = line.split("\t")
        out.setdefault(q, {})[d] = int(r)
    return out


def _trec_run(path: Path) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        q, _, d, _, s, _ = line.split()
        run.setdefault(urllib.parse.unquote(q), {})[urllib.parse.unquote(d)] = float(s)
    return run


@pytest.fixture(scope="module")
def beir_run(tiny_cross_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rerank") / "out"
    rc = main(["rerank", *BEIR, "--depth", "3", "--qrels", str(RERANK / "qrels" / "test.tsv"), "--recall-at", "3",
               "--model", str(tiny_cross_dir), "--out", str(out), *FAST])
    assert rc == 0
    return out


def test_beir_rerank_end_to_end(beir_run):
    report = _report(beir_run)
    assert report["rows"] == {"read": 900, "scored": 900, "rejected": 0}  # 300 queries x depth 3
    cand = report["rerank"]["candidates"]
    assert (cand["format"], cand["lines"], cand["depth"], cand["beyond_depth"]) == ("trec run", 9000, 3, 8100)
    assert report["rerank"]["corpus"]["entries"] == 1163 and report["rerank"]["queries"]["used"] == 300
    assert report["judgements"]["source"] == "qrels" and report["judgements"]["judgements"] == 9036
    m = report["metrics"]
    assert m["judged_by"] == "qrels" and m["queries"] == 300 and m["relevant_missing"] > 0
    assert m["unjudged_rows"] > 0 and m["recall_k"] == 3
    # the kept candidates are each query's top 3 of the BM25 run
    bm25 = _trec_run(RERANK / "bm25.trec")
    ranked = pd.read_csv(beir_run / "ranked.tsv", sep="\t", dtype=str, keep_default_na=False)
    kept = {q: set(g["doc_id"]) for q, g in ranked.groupby("qid")}
    assert kept == {q: set(sorted(docs, key=lambda d: -docs[d])[:3]) for q, docs in bm25.items()}


def test_rerank_metrics_equal_trec_eval_on_run_trec(beir_run):
    """trec_eval (pytrec_eval) on the run.trec we wrote, with the qrels: the report's numbers."""
    m = _report(beir_run)["metrics"]
    per_query = pytrec_eval.RelevanceEvaluator(_qrels(RERANK / "qrels" / "test.tsv"),
                                               {"ndcg_cut.10", "recall.3"}).evaluate(_trec_run(beir_run / "run.trec"))
    assert len(per_query) == m["queries"]
    assert abs(np.mean([v["ndcg_cut_10"] for v in per_query.values()]) - m["ndcg_at_10_linear"]) < 1e-9
    assert abs(np.mean([v["recall_3"] for v in per_query.values()]) - m["recall"]) < 1e-9


def test_msmarco_layout_reads_the_same_candidates(tiny_cross_dir, tmp_path):
    out = tmp_path / "out"
    ms = RERANK / "msmarco"
    assert main(["rerank", "--queries", str(ms / "queries.tsv"), "--corpus", str(ms / "collection.tsv"),
                 "--candidates", str(RERANK / "bm25.trec"), "--depth", "2", "--qrels", str(ms / "qrels.tsv"),
                 "--model", str(tiny_cross_dir), "--out", str(out), *FAST]) == 0
    report = _report(out)
    assert report["rows"] == {"read": 600, "scored": 600, "rejected": 0}
    assert report["rerank"]["corpus"]["layout"] == "msmarco" and report["judgements"]["layout"] == "trec"
    assert report["judgements"]["judgements"] == 9036


def test_missing_ids_are_rejected_and_every_line_is_accounted_for(tiny_cross_dir, tmp_path):
    run = tmp_path / "run.txt"
    run.write_text("q0001 Q0 threading.Thread 1 2.0 x\nq0001 Q0 no.such.doc 2 1.0 x\nnoquery Q0 threading.Thread 1 1 x\n"
                   "q0002 Q0 bad\n")
    out = tmp_path / "out"
    assert main(["rerank", "--queries", str(RERANK / "queries.jsonl"), "--corpus", str(RERANK / "corpus.jsonl"),
                 "--candidates", str(run), "--model", str(tiny_cross_dir), "--out", str(out), *FAST]) == 0
    report = _report(out)
    assert report["rows"] == {"read": 4, "scored": 1, "rejected": 3}
    with open(out / "rejects.tsv", encoding="utf-8", newline="") as f:
        rejects = {int(r["line"]): r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}
    assert rejects[2]["reason"] == f"doc id 'no.such.doc' is not in {RERANK / 'corpus.jsonl'}"
    assert (rejects[2]["qid"], rejects[2]["doc_id"]) == ("q0001", "no.such.doc")
    assert rejects[3]["reason"] == f"query id 'noquery' is not in {RERANK / 'queries.jsonl'}"
    assert rejects[4]["reason"].startswith("wrong number of fields for a TREC run line")
    assert report["metrics"] is None  # no labels, no qrels


def test_unjudged_rows_are_scored_ranked_and_counted(tiny_cross_dir, tmp_path):
    rows = sample_rows(2)
    for r in rows[::3]:
        r["label"] = ""  # unjudged
    data = write_tsv(tmp_path / "in.tsv", rows)
    out = tmp_path / "out"
    assert main(["run", str(data), "--model", str(tiny_cross_dir), "--out", str(out), *FAST]) == 0
    report = _report(out)
    assert report["rows"] == {"read": len(rows), "scored": len(rows), "rejected": 0}
    m = report["metrics"]
    assert m["unjudged_rows"] == len(rows[::3]) and m["judged_by"] == "labels" and m["queries"] == 2
    preds = [line.split("\t") for line in (out / "predictions.tsv").read_text().splitlines()]
    assert [p[1] for p in preds] == [r["label"] for r in rows]  # empty where unjudged
    assert len((out / "ranked.tsv").read_text().splitlines()) == len(rows) + 1
    assert report["judgements"] == {"source": "labels"}


def test_pandas_written_tsv_is_read_as_csv_and_reported(tiny_cross_dir, tmp_path):
    rows = sample_rows(1)
    rows[0]["doc"] = 'He said "quoted" words'
    raw = write_tsv(tmp_path / "raw.tsv", rows)  # quotes literal, as MS MARCO writes them
    quoted = tmp_path / "pandas.tsv"
    pd.DataFrame(rows).to_csv(quoted, sep="\t", index=False)
    scores = {}
    for name, path in (("raw", raw), ("pandas", quoted)):
        out = tmp_path / name
        assert main(["run", str(path), "--model", str(tiny_cross_dir), "--out", str(out), *FAST]) == 0
        entry = _report(out)["files"][0]
        scores[name] = (out / "predictions.tsv").read_text()
        assert entry["tsv_quoting"]["mode"] == ("csv" if name == "pandas" else "none"), entry
        assert entry["tsv_quoting"]["rule"].startswith("auto:")
    assert scores["raw"] == scores["pandas"]  # the same texts reach the model
    out = tmp_path / "forced"
    assert main(["run", str(quoted), "--tsv-quoting", "none", "--model", str(tiny_cross_dir), "--out", str(out),
                 *FAST]) == 0
    assert (out / "predictions.tsv").read_text() != scores["raw"]  # quotes kept: other scores
    assert _report(out)["files"][0]["tsv_quoting"] == {"mode": "none", "rule": "--tsv-quoting none"}


def test_ids_with_spaces_are_percent_encoded_in_run_trec_with_a_warning(tiny_cross_dir, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"qid": q, "query": "find the doc", "doc_id": d, "doc": t, "label": y}) + "\n"
                            for q, d, t, y in [("query 1", "doc a", "the doc", 1), ("query 1", "50%", "other", 0),
                                               ("q2", "d", "text", 1)]))
    out = tmp_path / "out"
    assert main(["run", str(data), "--model", str(tiny_cross_dir), "--out", str(out), *FAST]) == 0
    assert "warning: 2 rows have a qid or doc_id holding whitespace or '%'" in capsys.readouterr().err
    assert _report(out)["outputs"]["trec_escaped_rows"] == 2
    trec = {tuple(line.split()[:3]) for line in (out / "run.trec").read_text().splitlines()}
    assert trec == {("query%201", "Q0", "doc%20a"), ("query%201", "Q0", "50%25"), ("q2", "Q0", "d")}
    ranked = (out / "ranked.tsv").read_text()
    assert "query 1\tdoc a\t" in ranked  # the other files hold the ids as read


def test_help_states_defaults_once_and_whole_sentences(capsys):
    for command in (["--help"], ["run", "--help"], ["rerank", "--help"], ["generate", "--help"]):
        with pytest.raises(SystemExit):
            main(command)
        text = capsys.readouterr().out
        assert "(default: None)" not in text and "(default: False)" not in text, command
        assert "default: 1 on CPU, 8 on GPU)" in text or command != ["run", "--help"]
        assert text.count("(default: the model's) (default") == 0
    with pytest.raises(SystemExit):
        main(["--help"])
    description = capsys.readouterr().out.split("\n\n")[1]
    assert description.rstrip().endswith("quantize).")


def test_generate_refuses_scoring_only_options(tiny_decoder_dir, tmp_path):
    info = load_model_info(tiny_decoder_dir)
    for extra in ({"qrels": tmp_path / "qrels.tsv"}, {"recall_k": 10}):
        with pytest.raises(ConfigError, match="for scoring runs"):
            resolve(RunConfig(inputs=(tmp_path,), mode="generate", **extra), info)
    with pytest.raises(ConfigError, match="--tsv-quoting must be one of auto, csv, none"):
        resolve(RunConfig(inputs=(tmp_path,), mode="generate", tsv_quoting="maybe"), info)


def test_rerank_sigkill_then_resume_is_byte_identical_and_guards_the_corpus(tiny_cross_dir, tmp_path):
    from tests.job.test_resume import _same_results, _wait_for_windows

    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(RERANK / "corpus.jsonl", corpus)

    def cmd(out, *extra):
        return [sys.executable, "-m", "pipeline", "rerank", "--queries", str(RERANK / "queries.jsonl"), "--corpus",
                str(corpus), "--candidates", str(RERANK / "bm25.trec"), "--depth", "4", "--qrels",
                str(RERANK / "qrels" / "test.tsv"), "--model", str(tiny_cross_dir), "--out", str(out),
                "--no-progress", "--chunk-rows", "50", "--window-rows", "100", "--threads", "1", "--workers", "1",
                *extra]

    env = {**os.environ, "PIPELINE_CACHE": str(tmp_path / "cache")}
    reference = tmp_path / "ref"
    subprocess.run(cmd(reference), cwd=REPO_ROOT, check=True, capture_output=True, env=env)
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd(out), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _wait_for_windows(proc, out, 3)
    proc.kill()
    proc.wait()
    assert not (out / "report.json").exists()
    r = subprocess.run(cmd(out, "--resume"), cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    _same_results(reference, out)
    assert list((tmp_path / "cache" / "corpus-index").glob("*.npz"))  # the index was kept and reused
    # a resumed run must read the corpus its committed windows came from
    proc = subprocess.Popen(cmd(tmp_path / "out2"), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    _wait_for_windows(proc, tmp_path / "out2", 1)
    proc.kill()
    proc.wait()
    with open(corpus, "a", encoding="utf-8") as f:
        f.write('{"_id": "new", "title": "", "text": "a new document"}\n')
    r = subprocess.run(cmd(tmp_path / "out2", "--resume"), cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "resume" in r.stderr
