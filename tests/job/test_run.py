"""End-to-end runs through the CLI entry point, as a user runs them (small inputs)."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, RunConfig
from pipeline.engine.modeldir import load_model_info
from pipeline.job.run import run
from tests.sample_data import sample_rows, write_tsv

_sample_rows, _write_tsv = sample_rows, write_tsv


def _read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory) -> Path:
    return _write_tsv(tmp_path_factory.mktemp("data") / "small.tsv", _sample_rows(12))


def test_default_model_ranks_sample(small_sample, minilm_dir, tmp_path):
    out = tmp_path / "out"
    rc = main(["run", str(small_sample), "--model", str(minilm_dir), "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = _sample_rows(12)
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == {"read": len(rows), "scored": len(rows), "rejected": 0}
    # bi mode encodes each distinct text once
    distinct = len({r["query"] for r in rows} | {r["doc"] for r in rows})
    assert report["tokens"]["sequences"] == distinct
    assert 0 <= report["tokens"]["padding_overhead"] < 0.10
    # a real model on real text ranks far better than chance (random NDCG@10 ~ 0.27 on this data)
    assert report["metrics"]["ndcg_at_10"] > 0.5
    assert set(report["seconds"]) >= {"read", "tokenize", "infer", "rank", "write"}

    preds = _read_tsv(out / "predictions.tsv")
    assert [p[0] for p in preds] == [r["qid"] for r in rows]  # input order
    assert [p[1] for p in preds] == [r["label"] for r in rows]
    ranked = _read_tsv(out / "ranked.tsv")
    assert ranked[0] == ["qid", "doc_id", "rank", "score"]
    by_q: dict[str, list] = {}
    for q, d, rank, s in ranked[1:]:
        by_q.setdefault(q, []).append((int(rank), float(s), d))
    for q, items in by_q.items():
        assert [r for r, _, _ in items] == list(range(1, len(items) + 1))
        # score descending, equal scores by doc_id descending (trec_eval's order)
        assert all(s1 > s2 or (s1 == s2 and d1 > d2) for (_, s1, d1), (_, s2, d2) in zip(items, items[1:])), q
    # the score in ranked.tsv is the one in predictions.tsv for the same pair
    pred_score = {(r["qid"], r["doc_id"]): float(p[2]) for r, p in zip(rows, preds)}
    assert all(pred_score[(q, d)] == float(s) for q, d, _, s in ranked[1:])
    trec = (out / "run.trec").read_text().splitlines()
    assert len(trec) == len(rows) and trec[0].split()[1] == "Q0"
    with zipfile.ZipFile(out / "submission.zip") as z:
        assert sorted(z.namelist()) == ["predictions.tsv", "report.json"]
        assert z.read("predictions.tsv").decode() == (out / "predictions.tsv").read_text()
    assert not (out / ".partial").exists()


def test_bad_rows_go_to_rejects_and_counts_add_up(tiny_cross_dir, tmp_path):
    rows = _sample_rows(3)
    data = _write_tsv(tmp_path / "in.tsv", rows, extra_lines=[
        "qX\t\tdX\tsome doc\t1",  # empty query
        f"{rows[0]['qid']}\t{rows[0]['query']}\t{rows[0]['doc_id']}\tdup\t0",  # duplicate pair
        "qY\tquery\tdY\tdoc\tnot-a-number",  # bad label
        "qZ\tonly three\tfields",  # wrong field count
    ])
    out = tmp_path / "out"
    assert main(["run", str(data), "--model", str(tiny_cross_dir), "--out", str(out), "--no-progress",
                 "--workers", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == {"read": len(rows) + 4, "scored": len(rows), "rejected": 4}
    assert report["files"][0]["rows_read"] == report["files"][0]["rows_scored"] + report["files"][0]["rows_rejected"]
    rejects = _read_tsv(out / "rejects.tsv")
    assert len(rejects) == 5 and rejects[0][:3] == ["file", "line", "row"]
    lines = sorted(int(r[1]) for r in rejects[1:])
    assert lines == [len(rows) + 2 + i for i in range(4)]


def test_file_level_error_exits_nonzero_and_leaves_no_output(tiny_cross_dir, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("qid\tquery\tdoc\n1\ta\tb\n")  # no doc_id column
    out = tmp_path / "out"
    assert main(["run", str(bad), "--model", str(tiny_cross_dir), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.tsv" in err and "doc_id" in err
    assert not any(p.name in ("ranked.tsv", "report.json", "submission.zip") for p in out.glob("*"))


def test_workers_and_batch_settings_do_not_change_results(small_sample, tiny_cross_dir, tmp_path):
    outs = []
    for i, extra in enumerate([["--workers", "0", "--threads", "1"], ["--workers", "2", "--threads", "2", "--streams", "2"],
                               ["--workers", "1", "--chunk-rows", "37", "--window-rows", "100",
                                "--max-batch-tokens", "1024", "--max-batch-size", "7"]]):
        out = tmp_path / f"out{i}"
        assert main(["run", str(small_sample), "--model", str(tiny_cross_dir), "--out", str(out),
                     "--no-progress", *extra]) == 0
        outs.append(out)
    base_pred = (outs[0] / "predictions.tsv").read_text()
    # worker and stream counts (each stream single-threaded like the base run): byte-identical
    for name in ("predictions.tsv", "ranked.tsv", "run.trec", "rejects.tsv"):
        assert (outs[1] / name).read_bytes() == (outs[0] / name).read_bytes()
    s0 = np.array([float(l.split("\t")[2]) for l in base_pred.splitlines()])
    for out in outs[1:]:
        s = np.array([float(l.split("\t")[2]) for l in (out / "predictions.tsv").read_text().splitlines()])
        assert np.max(np.abs(s - s0)) < 1e-5
        r0 = [l.split("\t")[:3] for l in (outs[0] / "ranked.tsv").read_text().splitlines()]
        r = [l.split("\t")[:3] for l in (out / "ranked.tsv").read_text().splitlines()]
        assert r == r0


def test_pretokenized_input_scores_like_text(tiny_cross_dir, tmp_path):
    from pipeline.engine.tokenizer import WordPieceTokenizer

    info = load_model_info(tiny_cross_dir)
    tok = WordPieceTokenizer(info.vocab_file, info.tokenizer)
    rows = _sample_rows(2)
    enc = tok.encode_pairs([r["query"] for r in rows], [r["doc"] for r in rows], info.max_seq_len)
    text_file = _write_tsv(tmp_path / "text.tsv", rows)
    pre = tmp_path / "pre.jsonl"
    pre.write_text("".join(json.dumps({"qid": r["qid"], "doc_id": r["doc_id"], "label": int(r["label"]),
                                       "input_ids": enc.ids[i].tolist(), "token_type_ids": enc.types[i].tolist()}) + "\n"
                           for i, r in enumerate(rows)))
    res = []
    for f in (text_file, pre):
        out = tmp_path / f.stem
        assert main(["run", str(f), "--model", str(tiny_cross_dir), "--out", str(out), "--no-progress",
                     "--workers", "0"]) == 0
        res.append((out / "predictions.tsv").read_text())
    assert res[0] == res[1]


def test_impossible_settings_are_refused_at_startup(tiny_cross_dir, small_sample, tmp_path):
    info = load_model_info(tiny_cross_dir)
    with pytest.raises(ConfigError, match="max-batch-tokens"):
        run(RunConfig(inputs=(small_sample,), out_dir=tmp_path, max_seq_len=100, max_batch_tokens=64), info)
    with pytest.raises(ConfigError, match="position embeddings"):
        run(RunConfig(inputs=(small_sample,), out_dir=tmp_path, max_seq_len=10_000, max_batch_tokens=20_000), info)
    with pytest.raises(ConfigError, match="converted for"):
        run(RunConfig(inputs=(small_sample,), out_dir=tmp_path, mode="bi"), info)
    with pytest.raises(ConfigError, match="needs --device gpu"):
        run(RunConfig(inputs=(small_sample,), out_dir=tmp_path, precision="fp16"), info)
    with pytest.raises(ConfigError, match="--tensorrt and --precision fp16"):
        run(RunConfig(inputs=(small_sample,), out_dir=tmp_path, device="gpu", trt_varlen=True), info)
    with pytest.raises(ConfigError, match="each stream needs a thread"):
        run(RunConfig(inputs=(small_sample,), out_dir=tmp_path, threads=2, streams=3), info)
    with pytest.raises(ConfigError, match="streams > 1 is for the CPU"):
        run(RunConfig(inputs=(small_sample,), out_dir=tmp_path, device="gpu", threads=2, streams=2), info)


def test_streams_default_is_capped_by_threads_and_splits_them(tiny_cross_dir):
    from pipeline.config import STREAMS_DEFAULT, resolve

    info = load_model_info(tiny_cross_dir)
    assert resolve(RunConfig(threads=1), info).streams == 1
    s = resolve(RunConfig(threads=4), info)
    assert s.streams == min(STREAMS_DEFAULT, 4) and s.threads_per_stream == 4 // s.streams
    s = resolve(RunConfig(threads=5, streams=2), info)
    assert (s.streams, s.threads_per_stream) == (2, 2)
    assert resolve(RunConfig(threads=4, device="gpu"), info).streams == 1


def test_gpu_asked_on_a_cpu_install_fails_with_what_is_missing(tiny_cross_dir, small_sample, tmp_path, capsys):
    from pipeline.engine.predictor import gpu_available

    if gpu_available():
        pytest.skip("this machine has a GPU build")
    assert main(["run", str(small_sample), "--model", str(tiny_cross_dir), "--out", str(tmp_path / "o"),
                 "--device", "gpu", "--no-progress"]) == 2
    assert "requirements-gpu.txt" in capsys.readouterr().err


def test_bucketed_ranking_equals_one_bucket(small_sample, tiny_cross_dir, tmp_path, monkeypatch):
    """The final ranking is computed bucket by bucket (bounded memory); bucket size must not matter."""
    import pipeline.io.exports

    outs = []
    for per_bucket in (4096, 2):
        monkeypatch.setattr(pipeline.io.exports, "QUERIES_PER_BUCKET", per_bucket)
        out = tmp_path / f"b{per_bucket}"
        assert main(["run", str(small_sample), "--model", str(tiny_cross_dir), "--out", str(out),
                     "--no-progress", "--workers", "0"]) == 0
        outs.append(out)
    for name in ("ranked.tsv", "run.trec", "predictions.tsv"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    m0, m1 = (json.loads((o / "report.json").read_text())["metrics"] for o in outs)
    assert m0.keys() == m1.keys()
    for k in m0:
        if isinstance(m0[k], str):
            assert m0[k] == m1[k], k
        else:
            assert abs((m0[k] or 0) - (m1[k] or 0)) < 1e-12, k


def test_megabyte_text_is_truncated_not_batched_whole(tiny_cross_dir, tmp_path):
    rows = _sample_rows(1)[:3]
    rows[1]["doc"] = "lorem ipsum " * 90_000  # ~1 MB
    data = _write_tsv(tmp_path / "big.tsv", rows)
    out = tmp_path / "out"
    assert main(["run", str(data), "--model", str(tiny_cross_dir), "--out", str(out), "--no-progress",
                 "--workers", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows"]["scored"] == 3
    info = load_model_info(tiny_cross_dir)
    assert report["tokens"]["real"] <= 3 * info.max_seq_len


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60),
    st.sampled_from(["q1\tquery\td1\tdoc\t1", "q1\tquery\td1\tdoc\t1", "q2\t\td\tx\t0", "q3\tq\td3\tdoc\tabc",
                     "q4\t\"quoted\ttext\td4\tdoc\t2", "\x00\t\x00\t\x00\t\x00\t\x00", "a\tb", ""]),
), max_size=25), st.sampled_from(["tsv", "jsonl"]))
def test_hostile_input_never_crashes_and_counts_add_up(tiny_cross_dir, tmp_path_factory, lines, fmt):
    folder = tmp_path_factory.mktemp("hostile")
    if fmt == "tsv":
        data = folder / "in.tsv"
        data.write_text("qid\tquery\tdoc_id\tdoc\tlabel\n" + "\n".join(lines) + "\n", encoding="utf-8")
    else:
        data = folder / "in.jsonl"
        good = json.dumps({"qid": "q0", "query": "first", "doc_id": "d0", "doc": "row", "label": 1})
        data.write_text("\n".join([good] + [l.replace("\t", " ") for l in lines]) + "\n", encoding="utf-8")
    out = folder / "out"
    # The header (or the first JSON object) is valid, so the only file-level problem possible is a
    # TSV without a single data line; everything else is row-level: the run must finish and
    # account for every row.
    no_rows = fmt == "tsv" and not any(raw.strip() for raw in ("\n".join(lines) + "\n").encode().split(b"\n"))
    rc = main(["run", str(data), "--model", str(tiny_cross_dir), "--out", str(out), "--no-progress", "--workers", "0"])
    if no_rows:
        assert rc == 2 and not (out / "report.json").exists()
        return
    assert rc == 0
    r = json.loads((out / "report.json").read_text())
    assert r["rows"]["read"] == r["rows"]["scored"] + r["rows"]["rejected"] >= (fmt == "jsonl")
    rejects = (out / "rejects.tsv").read_text(encoding="utf-8").splitlines()
    assert len(rejects) - 1 == r["rows"]["rejected"]
    assert len((out / "predictions.tsv").read_text(encoding="utf-8").splitlines()) == r["rows"]["scored"]


def test_a_rerun_keeps_the_previous_results_until_it_publishes(small_sample, tiny_cross_dir, tmp_path):
    """A second run into the same folder that stops half-way (cancelled, as Ctrl-C does) leaves the
    first run's files as they were; a rerun replaces them only when it publishes its own."""
    from pipeline.cancel import Cancelled, CancelToken
    from pipeline.io.store import FILES

    out = tmp_path / "out"
    info = load_model_info(tiny_cross_dir)
    cfg = RunConfig(inputs=(small_sample,), out_dir=out, workers=0, threads=1, chunk_rows=50, window_rows=50,
                    progress=False)
    run(cfg, info)
    before = {name: (out / name).read_bytes() for name in FILES if name != "report.json"}
    cancel = CancelToken()

    class Zeros:  # backend double: every score 0; cancels the run at call `cancel_at`
        concurrency = 1

        def __init__(self, cancel_at=None):
            self.calls, self.cancel_at = 0, cancel_at

        def run(self, ids, types, mask):
            self.calls += 1
            if self.calls == self.cancel_at:
                cancel.cancel()
            return np.zeros(len(ids), np.float32)

    with pytest.raises(Cancelled):
        run(cfg, info, cancel, backend=Zeros(cancel_at=8))
    assert {name: (out / name).read_bytes() for name in before} == before
    assert (out / ".partial").is_dir()
    # --restart then publishes a complete new set (the double's scores are all 0)
    run(RunConfig(**{**cfg.__dict__, "restart": True}), info, backend=Zeros())
    scores = {line.split("\t")[2] for line in (out / "predictions.tsv").read_text().splitlines()}
    assert scores == {"0.0"} and not (out / ".partial").exists()
