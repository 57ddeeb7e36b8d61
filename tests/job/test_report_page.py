"""report.html (pipeline/job/report_page.py): built by every run from its published files, its
numbers equal report.json's, it stays small, `pipeline report OUT --compare OTHER` rebuilds it,
and a headless Chromium renders it from disk with the network off."""

import html
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import REPO_ROOT
from pipeline.job.report_page import SIZE_LIMIT_BYTES, build_page
from tests.sample_data import sample_rows, write_tsv

ARTEFACTS = REPO_ROOT / "test-artefacts"  # git-ignored: screenshots of the browser test


class _Tagged(HTMLParser):
    """Every element's data-key -> data-value, and the count of chart SVGs."""

    def __init__(self):
        super().__init__()
        self.values: dict[str, list] = {}
        self.svgs = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-key" in a:
            self.values.setdefault(a["data-key"], []).append(json.loads(a["data-value"]))
        self.svgs += tag == "svg"


def _lookup(report: dict, key: str):
    v = report
    for part in key.split("."):
        v = v[int(part)] if isinstance(v, list) else v[part]
    return v


def _check_numbers(out: Path) -> _Tagged:
    report = json.loads((out / "report.json").read_text())
    page = _Tagged()
    page.feed((out / "report.html").read_text())
    assert page.values, "no tagged numbers on the page"
    for key, values in page.values.items():
        if key.startswith("delta."):
            continue
        assert all(v == _lookup(report, key) for v in values), key
    return page


@pytest.fixture(scope="module")
def scoring_run(tiny_cross_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    rows = sample_rows(12)
    data = write_tsv(tmp / "in.tsv", rows, extra_lines=["qX\t\tdX\tsome doc\t1", "qZ\tonly three\tfields"])
    out = tmp / "out"
    assert main(["run", str(data), "--model", str(tiny_cross_dir), "--out", str(out), "--no-progress",
                 "--workers", "0"]) == 0
    return out


def test_scoring_page_numbers_equal_report_json(scoring_run):
    page = _check_numbers(scoring_run)
    for key in ("rows.read", "rows.scored", "rows.rejected", "seconds.total", "metrics.ndcg_at_10",
                "tokens.padding_overhead", "rows_per_second"):
        assert key in page.values, key
    assert page.svgs >= 2  # time per stage, score distribution
    text = (scoring_run / "report.html").read_text()
    assert "empty" in text.lower() or "reason" in text  # the reject reasons table
    assert (scoring_run / "report.html").stat().st_size < SIZE_LIMIT_BYTES


def test_scoring_page_per_query_ndcg_and_worst_queries_equal_the_files(scoring_run):
    report = json.loads((scoring_run / "report.json").read_text())
    head, *lines = (scoring_run / "queries.tsv").read_text().splitlines()
    ndcg = {q: float(v) for q, v in (line.split("\t") for line in lines)}
    assert head == "qid\tndcg_at_10" and len(ndcg) == report["metrics"]["queries"]
    q = report["queries"]
    assert sum(q["ndcg_at_10_counts"]) == len(ndcg)
    worst = q["worst"]
    assert [w["ndcg_at_10"] for w in worst] == sorted(ndcg.values())[:len(worst)]
    ranked = [line.split("\t") for line in (scoring_run / "ranked.tsv").read_text().splitlines()[1:]]
    for w in worst:  # the top documents are ranked.tsv's, in its order
        assert [d["doc_id"] for d in w["top"]] == [r[1] for r in ranked if r[0] == w["qid"]][:10]
    assert any(d["label"] is not None for w in worst for d in w["top"])
    # the texts, file and line of the input rows, read again from the input
    data = scoring_run.parent / "in.tsv"
    lines = data.read_text(encoding="utf-8").splitlines()
    head = lines[0].split("\t")
    by_pair = {}
    for n, line in enumerate(lines[1:], start=2):
        f = dict(zip(head, line.split("\t")))
        by_pair.setdefault((f["qid"], f.get("doc_id")), (n, f))
    for w in worst:
        for d in w["top"]:
            n, f = by_pair[(w["qid"], d["doc_id"])]
            cut = f["doc"][:400] + (" ..." if len(f["doc"]) > 400 else "")
            assert (d["file"], d["line"], d["text"]) == (str(data), n, cut)
        assert w["query"] == by_pair[(w["qid"], w["top"][0]["doc_id"])][1]["query"]
    page = _check_numbers(scoring_run)  # every label and NDCG on the page equals report.json's
    assert "queries.worst.0.ndcg_at_10" in page.values and "queries.worst.0.top.0.label" in page.values
    text = (scoring_run / "report.html").read_text()
    assert text.count('class="worst-query"') == len(worst)
    assert html.escape(worst[0]["query"], quote=True) in text
    assert html.escape(f'{worst[0]["top"][0]["file"]}:{worst[0]["top"][0]["line"]}', quote=True) in text
    # the score histogram holds every scored pair
    scores = report["scores"]
    assert scores["pairs"] == report["rows"]["scored"] == sum(scores["counts"]) + scores["nonfinite"]
    assert len(scores["bins"]) == len(scores["counts"]) + 1 and scores["nonfinite"] == 0
    assert page.values["scores.pairs"] == [scores["pairs"]]
    ranked_scores = [float(r[3]) for r in ranked]
    assert scores["bins"][0] == pytest.approx(min(ranked_scores), abs=1e-6)
    assert scores["bins"][-1] == pytest.approx(max(ranked_scores), abs=1e-6)
    windows = report["throughput"]["windows"]
    assert windows and sum(w[1] for w in windows) == report["rows"]["scored"] + report["rows"]["rejected"]
    assert f'data-windows="{len(windows)}"' in text


def test_page_has_no_network_references(scoring_run):
    text = (scoring_run / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<link" not in text and "@import" not in text and not re.search(r"url\(\s*['\"]?https?:", text)


def test_report_command_rebuilds_and_compares(scoring_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(scoring_run, other)
    (other / "report.html").unlink()
    assert main(["report", str(other), "--compare", str(scoring_run)]) == 0
    lines = (other / "queries.tsv").read_text().splitlines()
    qid = lines[1].split("\t")[0]
    lines[1] = f"{qid}\t-1.0"  # one query's NDCG changed in the other run
    (other / "queries.tsv").write_text("\n".join(lines) + "\n")
    assert main(["report", str(other), "--compare", str(scoring_run)]) == 0
    page = _check_numbers(other)
    assert page.values["delta.ndcg_at_10"] == [0.0]
    text = (other / "report.html").read_text()
    assert 'data-changed-queries="1"' in text and f'class="query-delta" data-qid="{qid}"' in text
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_generation_page_numbers_equal_report_json(tiny_decoder_dir, tmp_path):
    from pipeline.engine.modeldir import load_model_info
    from pipeline.job.run import run
    from tests.job.test_generate import cfg_for, write_prompts

    src = write_prompts(tmp_path / "in.jsonl", 12)
    out = tmp_path / "out"
    run(cfg_for([src], out), load_model_info(tiny_decoder_dir))
    page = _check_numbers(out)
    assert {"rows.generated", "generated_tokens_per_second", "metrics.rouge_l", "sample.of"} <= set(page.values)
    assert page.svgs >= 3  # stages, output lengths, finish reasons
    text = (out / "report.html").read_text()
    assert text.count('class="sample"') == 12
    # the sample: every row (12 < SAMPLE_ROWS), worst ROUGE-L first (recomputed here from the
    # published rows), each with its prompt, file and line read again from the input
    from pipeline.tasks.text_metrics import rouge_l_per_row

    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    rouge = dict(zip((r["id"] for r in rows), rouge_l_per_row([r["candidates"][0]["text"] for r in rows],
                                                              [r["references"] for r in rows])))
    sample = report["sample"]
    assert sample["of"] == 12 and [r["id"] for r in sample["rows"]] == sorted(rouge, key=lambda i: (rouge[i], i))
    inputs = {o["id"]: (n, o) for n, o in enumerate(map(json.loads, src.read_text().splitlines()), start=1)}
    for r in sample["rows"]:
        n, o = inputs[r["id"]]
        assert r["rouge_l"] == pytest.approx(rouge[r["id"]], abs=1e-12)
        assert (r["prompt"], r["file"], r["line"], r["references"]) == (o["prompt"], str(src), n, [o["reference"]])
        assert html.escape(o["prompt"], quote=True) in text
    lengths = Counter(r["candidates"][0]["num_tokens"] for r in rows)
    assert report["outputs"]["best_candidate_tokens"] == [[n, lengths[n]] for n in sorted(lengths)]
    reasons = Counter(c["finish_reason"] for r in rows for c in r["candidates"])
    assert report["outputs"]["finish_reasons"] == dict(reasons)
    assert all(f"outputs.finish_reasons.{k}" in page.values for k in reasons)
    other = tmp_path / "other"
    shutil.copytree(out, other)
    rows = [json.loads(line) for line in (other / "generations.jsonl").read_text().splitlines()]
    rows[3]["candidates"][0]["text"] = "a different best candidate"
    (other / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(other), "--compare", str(out)]) == 0
    text = (other / "report.html").read_text()
    assert 'data-changed-rows="1"' in text and text.count('class="changed-row"') == 1
    assert "a different best candidate" in text


def test_a_large_run_stays_under_the_size_limit(tmp_path):
    """A 1,000,000-pair run's report.json at its largest (every bounded section full, every
    text at its cut length): the page summarises, it does not list rows, and it reads no
    per-row file (there is no ranked.tsv here)."""
    from pipeline.io.exports import NDCG_BINS, SCORE_BINS, WORST_QUERIES, WORST_TOP_DOCS
    from pipeline.io.row_texts import MAX_TEXT_CHARS

    out = tmp_path / "big"
    out.mkdir()
    report = json.loads((Path(__file__).parent / "report_fixture.json").read_text())
    report["rows"] = {"read": 1_000_000, "scored": 1_000_000, "rejected": 0}
    long = "<&word> " * (MAX_TEXT_CHARS // 8) + " ..."
    report["scores"] = {"pairs": 1_000_000, "bins": [i / SCORE_BINS for i in range(SCORE_BINS + 1)],
                        "counts": [1_000_000 // SCORE_BINS] * SCORE_BINS, "nonfinite": 0}
    report["queries"] = {"ndcg_at_10_bins": [i / NDCG_BINS for i in range(NDCG_BINS + 1)],
                         "ndcg_at_10_counts": [100_000 // NDCG_BINS] * NDCG_BINS, "file": "queries.tsv",
                         "worst": [{"qid": f"q{i}", "ndcg_at_10": 0.0, "query": long,
                                    "top": [{"doc_id": f"d{i}-{j}", "rank": j + 1, "score": 0.5, "label": 0.0,
                                             "row": j, "file": "data/big.tsv", "line": 10_000_000 + j, "text": long}
                                            for j in range(WORST_TOP_DOCS)]} for i in range(WORST_QUERIES)]}
    report["throughput"] = {"windows": [[float(i + 1), 5000, 640_000, 1] for i in range(200)]}
    (out / "report.json").write_text(json.dumps(report))
    size = len(build_page(out).encode())
    assert size < SIZE_LIMIT_BYTES, size
    del report["scores"], report["queries"]  # a run of an older version: the page says what is missing
    (out / "report.json").write_text(json.dumps(report))
    assert "not in report.json (a run of an older version)" in build_page(out)


def test_chromium_renders_the_page_offline(scoring_run):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("PIPELINE_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed, and PIPELINE_REQUIRE_BROWSER=1 requires the browser test")
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")
    page = (scoring_run / "report.html").resolve()
    ARTEFACTS.mkdir(exist_ok=True)
    shot = ARTEFACTS / "report-scoring.png"
    offline = ["--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
               "--proxy-bypass-list=<-loopback>", "--user-data-dir=" + str(scoring_run.parent / "chromium-profile")]
    dom = subprocess.run([chromium, *offline, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=20).stdout
    assert re.search(r'data-rendered="[1-9]', dom), "the page's script did not run to the end"
    assert re.search(r'<pre id="script-errors" class="bad"></pre>', dom), "script errors on the page"
    subprocess.run([chromium, *offline, "--window-size=1200,1800", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=20)
    assert shot.is_file() and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
