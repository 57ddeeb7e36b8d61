"""RunStore (pipeline.io.store) and the final ranking files (pipeline.io.exports), without a model.

The outputs are checked byte for byte against a fixture written by the previous, TSV-based
writer and against an independent pandas implementation (sort by qid first appearance,
-score, doc_id, row); resumption after a kill or a cancelled finish, the resume errors, and a
finish with more buckets than the process may open files are checked at the store level.
"""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
import textwrap
import urllib.parse
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cancel import CancelToken, Cancelled
from pipeline.config import REPO_ROOT
from pipeline.io import exports
from pipeline.io.exports import trec_id, write_ranking_outputs
from pipeline.io.reader import Reject
from pipeline.io.store import FILES, MANIFEST, PARTIAL, ResumeError, RunStore
from pipeline.ranking import RankingMetrics, ranking_metrics

SCHEMA = pa.schema([("row", pa.int64()), ("file", pa.int32()), ("line", pa.int64()), ("qid", pa.string()),
                    ("doc_id", pa.string()), ("label", pa.float64()), ("score", pa.float64())])
RESULTS = ("predictions.tsv", "ranked.tsv", "run.trec", "rejects.tsv")
FP = {"inputs": ["a.tsv"], "settings": {"window_rows": 4}}
nan, inf = float("nan"), float("inf")

# --------------------------------------------------------------------------- data and references


def table(rows: list[tuple]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [()] * len(SCHEMA)
    return pa.table([pa.array(list(c), f.type) for c, f in zip(cols, SCHEMA)], schema=SCHEMA)


def random_windows(seed: int, n_windows: int = 5, max_rows: int = 25, n_queries: int = 30) -> list:
    """Windows of (scored rows, rejects) with ids holding tabs, newlines, spaces, non-ASCII; tied,
    signed-zero and infinite scores; NaN and fractional labels; queries spread over windows."""
    rng = random.Random(seed)
    alphabet = ["a", "b", "Z", "é", " ", "\t", "\n", "\r", "漢", "1", "_", '"', "#", "NA", "\u2028"]

    def text(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, n)))

    qids = sorted({text(4) for _ in range(n_queries)})
    windows, row = [], 0
    for _ in range(n_windows):
        rows, rejects = [], []
        for _ in range(rng.randint(0, max_rows)):
            if rng.random() < 0.1:
                rejects.append(Reject(text(5), rng.randint(1, 999), row, "bad\trow\n" + text(3), text(3), text(3)))
            else:
                label = rng.choice([nan, 0.0, 1.0, 2.0, -0.0, 0.5, 30.0, 3.25])
                score = rng.choice([0.0, -0.0, 1.0, 0.5, inf, -inf, rng.random(), rng.gauss(0, 1), 1 / 3])
                rows.append((row, 0, row + 2, rng.choice(qids), text(3), label, score))
            row += 1
        windows.append((rows, rejects))
    return windows


def ref_clean(s: str) -> str:
    return re.sub(r"[\t\n\r]", " ", s)


def ref_label(x: float) -> str:
    return "" if math.isnan(x) else str(int(x)) if x == int(x) else repr(x)


def ref_trec_id(s: str) -> str:
    """run.trec's documented escaping: whitespace and % percent-encoded, UTF-8 bytes."""
    return "".join(urllib.parse.quote(c, safe="") if c.isspace() or c == "%" else c for c in s)


def reference(windows: list, tag: str = "tag") -> dict[str, str]:
    """The four result files, written with pandas and plain loops."""
    rows = [r for w, _ in windows for r in w]
    df = pd.DataFrame(rows, columns=SCHEMA.names)
    df["qid"], df["doc_id"] = df["qid"].map(ref_clean), df["doc_id"].map(ref_clean)
    out = {"predictions.tsv": "".join(f"{q}\t{ref_label(y)}\t{s!r}\n" for q, y, s in
                                      zip(df["qid"], df["label"], df["score"]))}
    df["first_seen"] = pd.factorize(df["qid"])[0]
    df["neg_score"] = -(df["score"] + 0.0)  # + 0.0: -0.0 ties with 0.0
    df = df.sort_values(["first_seen", "neg_score", "doc_id", "row"], ascending=[True, True, False, True],
                        kind="stable")
    df["rank"] = df.groupby("first_seen").cumcount() + 1
    out["ranked.tsv"] = "qid\tdoc_id\trank\tscore\n" + "".join(
        f"{q}\t{d}\t{r}\t{s!r}\n" for q, d, r, s in zip(df["qid"], df["doc_id"], df["rank"], df["score"]))
    out["run.trec"] = "".join(f"{ref_trec_id(q)} Q0 {ref_trec_id(d)} {r} {s!r} {tag}\n"
                              for q, d, r, s in zip(df["qid"], df["doc_id"], df["rank"], df["score"]))
    out["rejects.tsv"] = "file\tline\trow\tqid\tdoc_id\treason\n" + "".join(
        "\t".join([ref_clean(r.file), str(r.line), str(r.row), ref_clean(r.qid), ref_clean(r.doc_id),
                   ref_clean(r.reason)]) + "\n" for _, rej in windows for r in rej)
    return out


def commit(store: RunStore, windows: list, start: int = 0) -> None:
    for w in range(start, len(windows)):
        rows, rejects = windows[w]
        store.commit_window(table(rows), rejects, w + 1, {"rows": w})


def finish(store: RunStore, cancel: CancelToken | None = None, **kw):
    metrics = write_ranking_outputs(store, "tag", True, cancel, **kw).metrics
    store.write_report({"metrics": metrics.to_dict() if metrics else None})
    store.publish()
    return metrics


def results(out: Path) -> dict[str, str]:
    return {name: (out / name).read_text(encoding="utf-8") for name in RESULTS}


# --------------------------------------------------------------------------- byte identity

# Written by the TSV-based writer this store replaces (pipeline/writer.py before Parquet parts),
# with QUERIES_PER_BUCKET = 2, tag "tag", labelled; since then, tied scores rank by doc_id
# descending (trec_eval's order) and run.trec percent-encodes whitespace in ids.
FIXTURE_WINDOWS = [
    ([(0, 0, 2, "q1", "d\t1", 1.0, 0.5), (1, 0, 3, "q2", "b", 0.0, -0.0), (2, 0, 4, "q1", "a", 2.0, 0.5),
      (3, 0, 5, "q 3", "x y", nan, inf)],
     [Reject("in.tsv", 6, 4, "empty doc", "q\t9", "dz")]),
    ([(5, 0, 7, "q2", "a", 0.5, 0.0), (6, 0, 8, "q1", "c", 0.0, 1 / 3), (7, 0, 9, "q\n4", "é", 3.0, -inf)],
     [Reject("in\tx.tsv", 10, 8, "field\r\ncount", "", "")]),
    ([], []),
    ([(9, 0, 11, "q 3", "x y", 1.0, 2.5), (10, 0, 12, "q2", "c", 4.25, 1e-300)], []),
]
FIXTURE = {
    "predictions.tsv": "q1\t1\t0.5\nq2\t0\t-0.0\nq1\t2\t0.5\nq 3\t\tinf\nq2\t0.5\t0.0\nq1\t0\t0.3333333333333333\n"
                       "q 4\t3\t-inf\nq 3\t1\t2.5\nq2\t4.25\t1e-300\n",
    "ranked.tsv": "qid\tdoc_id\trank\tscore\nq1\td 1\t1\t0.5\nq1\ta\t2\t0.5\nq1\tc\t3\t0.3333333333333333\n"
                  "q2\tc\t1\t1e-300\nq2\tb\t2\t-0.0\nq2\ta\t3\t0.0\nq 3\tx y\t1\tinf\nq 3\tx y\t2\t2.5\n"
                  "q 4\té\t1\t-inf\n",
    "run.trec": "q1 Q0 d%201 1 0.5 tag\nq1 Q0 a 2 0.5 tag\nq1 Q0 c 3 0.3333333333333333 tag\nq2 Q0 c 1 1e-300 tag\n"
                "q2 Q0 b 2 -0.0 tag\nq2 Q0 a 3 0.0 tag\nq%203 Q0 x%20y 1 inf tag\nq%203 Q0 x%20y 2 2.5 tag\n"
                "q%204 Q0 é 1 -inf tag\n",
    "rejects.tsv": "file\tline\trow\tqid\tdoc_id\treason\nin.tsv\t6\t4\tq 9\tdz\tempty doc\n"
                   "in x.tsv\t10\t8\t\t\tfield  count\n",
}
# By hand: q1 ranks d 1 (1), a (2), c (0); q2 c (4.25), b (0), a (0.5); q 3 its unjudged row
# (score inf) first, then the judged one (1); q 4 é (3). RR = (1 + 1 + 1/2 + 1) / 4; NDCG
# (2**label - 1) = (0.79672 + 0.99704 + 0.63093 + 1) / 4; linear = (0.85975 + 0.98566 + 0.63093 + 1) / 4.
FIXTURE_METRICS = {"mrr_at_10": 0.875, "ndcg_at_10": 0.8561679876517765, "pnr": None, "pairs_correct": 4,
                   "pairs_wrong": 0, "pairs_tied": 2, "queries": 4, "queries_without_relevant": 0, "k": 10,
                   "ndcg_at_10_linear": 0.8690773263433904, "recall": None, "recall_k": None, "unjudged_rows": 1,
                   "queries_without_judgements": 0, "judged_by": "labels", "qrels_queries": None,
                   "qrels_queries_without_candidates": None, "relevant_missing": None,
                   "ndcg_gain": RankingMetrics.NDCG_GAIN}


@pytest.mark.parametrize("per_bucket", [1, 2, 4096])
def test_outputs_equal_the_tsv_writers(tmp_path, per_bucket):
    store = RunStore(tmp_path, FP, resume=False, restart=False)
    commit(store, FIXTURE_WINDOWS)
    metrics = finish(store, queries_per_bucket=per_bucket)
    assert results(tmp_path) == FIXTURE == reference(FIXTURE_WINDOWS)
    assert metrics.to_dict() == FIXTURE_METRICS
    assert json.loads((tmp_path / "report.json").read_text())["metrics"] == FIXTURE_METRICS
    assert set(FILES) <= {p.name for p in tmp_path.iterdir()} and not (tmp_path / ".partial").exists()


@pytest.mark.parametrize("seed", range(12))
def test_outputs_equal_an_independent_implementation(tmp_path, seed, monkeypatch):
    windows = random_windows(seed)
    monkeypatch.setattr(exports, "QUERIES_PER_BUCKET", [1, 3, 4096][seed % 3])
    store = RunStore(tmp_path, FP, resume=False, restart=False)
    commit(store, windows)
    metrics = finish(store)
    assert results(tmp_path) == reference(windows)
    rows = [r for w, _ in windows for r in w]
    labelled = [r for r in rows if not math.isnan(r[5])]
    if not labelled:
        assert metrics is None
        return
    whole = ranking_metrics(np.array([ref_clean(r[3]) for r in rows], dtype=object),
                            np.array([ref_clean(r[4]) for r in rows], dtype=object),
                            np.array([r[5] for r in rows]), np.array([r[6] for r in rows]))
    for key, want in whole.to_dict().items():
        got = metrics.to_dict()[key]
        assert got == want or (got is not None and want is not None and abs(got - want) < 1e-12), key


def test_a_hash_collision_falls_back_to_exact_qids(tmp_path, monkeypatch):
    windows = random_windows(3)
    monkeypatch.setattr(exports, "_hash_keys", lambda qids: np.array([len(q) % 2 for q in qids], dtype=np.int64))
    monkeypatch.setattr(exports, "QUERIES_PER_BUCKET", 2)
    store = RunStore(tmp_path, FP, resume=False, restart=False)
    commit(store, windows)
    finish(store)
    assert results(tmp_path) == reference(windows)


def test_first_seen_numbering_equals_a_dict():
    rng = np.random.default_rng(0)
    hashed, exact = exports._HashedFirstSeen(), exports._ExactFirstSeen()
    for size in [0, 1, 5, 300, 40, 2000, 7, 1000, 0, 3000] * 3:
        qids = [f"q{i}" for i in rng.integers(0, 5000, size)]
        assert hashed.codes(qids).tolist() == exact.codes(qids).tolist()
    assert len(hashed.runs) < 12 and sum(len(k) for k, _ in hashed.runs) == hashed.count == len(exact.code_of)


def test_store_keeps_any_columns_and_cleans_top_level_strings(tmp_path):
    store = RunStore(tmp_path, FP, resume=False, restart=False)
    t = pa.table({"qid": ["a\tb"], "n_best": pa.array([["x\ty", "z"]], pa.list_(pa.string())),
                  "score": pa.array([[0.5, 0.25]], pa.list_(pa.float64()))})
    store.commit_window(t, [], 1, {})
    back = RunStore(tmp_path, FP, resume=True, restart=False).read_part(0)
    assert back.schema == t.schema
    assert back.to_pylist() == [{"qid": "a b", "n_best": ["x\ty", "z"], "score": [0.5, 0.25]}]
    with pytest.raises(TypeError, match="pyarrow.Table"):
        store.commit_window({"qid": ["a"]}, [], 2, {})


# --------------------------------------------------------------------------- resume


def test_resume_continues_where_the_run_stopped(tmp_path):
    windows = random_windows(5, n_windows=6)
    store = RunStore(tmp_path, FP, resume=False, restart=False)
    commit(store, windows[:2])
    del store  # the process dies here
    with pytest.raises(ResumeError, match="--resume"):
        RunStore(tmp_path, FP, resume=False, restart=False)
    store = RunStore(tmp_path, FP, resume=True, restart=False)
    assert (store.windows, store.chunks, store.resumed, store.manifest["tally"]) == (2, 2, True, {"rows": 1})
    assert store.manifest["rows_committed"] == sum(len(r) + len(j) for r, j in windows[:2])
    commit(store, windows, start=2)
    finish(store)
    assert results(tmp_path) == reference(windows)


def test_files_written_after_the_last_manifest_are_ignored_on_resume(tmp_path):
    windows = random_windows(6, n_windows=4)
    store = RunStore(tmp_path, FP, resume=False, restart=False)
    commit(store, windows[:1])
    # killed between parts and manifest of window 1, and leftovers of other kinds
    p = store.partial
    other = RunStore(tmp_path / "other", FP, resume=False, restart=False)
    commit(other, random_windows(99, n_windows=2))
    for name in ("part-000001.parquet", "rejects-000001.parquet"):
        (p / name).write_bytes((other.partial / name).read_bytes())
    (p / "part-000002.parquet.tmp").write_bytes(b"half a part")
    (p / "part-999999.tsv").write_text("garbage\n")
    (p / "buckets").mkdir()
    (p / "buckets" / "000000.arrows").write_bytes(b"x")
    (p / "predictions.tsv").write_text("half\n")
    store = RunStore(tmp_path, FP, resume=True, restart=False)
    assert store.windows == 1
    assert sorted(x.name for x in p.iterdir()) == [MANIFEST, "part-000000.parquet", "rejects-000000.parquet"]
    commit(store, windows, start=1)
    finish(store)
    assert results(tmp_path) == reference(windows)


def test_resume_of_a_run_killed_before_its_first_commit_starts_over(tmp_path):
    store = RunStore(tmp_path, FP, resume=False, restart=False)
    (store.partial / "part-000000.parquet.tmp").write_bytes(b"half a part")
    store = RunStore(tmp_path, FP, resume=True, restart=False)
    assert store.windows == 0 and not store.resumed and list(store.partial.iterdir()) == []


def _manifest(out: Path) -> Path:
    return out / ".partial" / MANIFEST


@pytest.mark.parametrize("state, message", [
    ("no partial", r"no unfinished run in .* to resume .*run without --resume"),
    ("empty partial", r"no unfinished run in .* to resume .*run without --resume"),
    ("not json", r"manifest\.json cannot be read .*--restart"),
    ("not utf-8", r"manifest\.json cannot be read .*--restart"),
    ("not an object", r"manifest\.json is corrupt \(not a JSON object\).*--restart"),
    ("no windows", r"manifest\.json is corrupt \('windows' is missing.*--restart"),
    ("older format", r"manifest\.json was written by another version .*--restart"),
    ("part missing", r"lacks committed file part-000001\.parquet .*--restart"),
    ("other settings", r"made with other settings; .*--restart"),
])
def test_resume_errors_say_what_to_do(tmp_path, state, message):
    if state != "no partial":
        store = RunStore(tmp_path, FP, resume=False, restart=False)
        if state != "empty partial":
            commit(store, random_windows(1, n_windows=2))
    m = json.loads(_manifest(tmp_path).read_text()) if _manifest(tmp_path).exists() else None
    edits = {"not json": lambda: _manifest(tmp_path).write_text("{\"windows\": 2, "),
             "not utf-8": lambda: _manifest(tmp_path).write_bytes(b"\xff\xfe{}"),
             "not an object": lambda: _manifest(tmp_path).write_text("[]"),
             "no windows": lambda: _manifest(tmp_path).write_text(json.dumps({k: v for k, v in m.items()
                                                                              if k != "windows"})),
             "older format": lambda: _manifest(tmp_path).write_text(json.dumps({k: v for k, v in m.items()
                                                                                if k != "format"})),
             "part missing": lambda: (tmp_path / ".partial" / "part-000001.parquet").unlink()}
    edits.get(state, lambda: None)()
    fp = {**FP, "settings": {"window_rows": 8}} if state == "other settings" else FP
    with pytest.raises(ResumeError, match=message) as e:
        RunStore(tmp_path, fp, resume=True, restart=False)
    if state in ("not json", "not an object"):
        assert str(_manifest(tmp_path)) in str(e.value)
    store = RunStore(tmp_path, fp, resume=False, restart=True)  # --restart always gets past it
    assert store.windows == 0 and list(store.partial.iterdir()) == []


def test_plain_run_refuses_an_unreadable_manifest_and_restart_discards_it(tmp_path):
    store = RunStore(tmp_path, FP, resume=False, restart=False)
    commit(store, random_windows(1, n_windows=2))
    _manifest(tmp_path).write_text("{")
    with pytest.raises(ResumeError, match="unreadable.*--restart"):
        RunStore(tmp_path, FP, resume=False, restart=False)
    assert len(list((tmp_path / PARTIAL).glob("part-*"))) == 2, "nothing may be discarded without --restart"
    store = RunStore(tmp_path, FP, resume=False, restart=True)
    assert store.windows == 0 and list(store.partial.iterdir()) == []


def test_previous_results_stay_until_the_new_run_publishes(tmp_path):
    for name in FILES:
        (tmp_path / name).write_text(f"old {name}\n")
    (tmp_path / "notes.txt").write_text("mine\n")
    windows = random_windows(8)
    store = RunStore(tmp_path, FP, resume=False, restart=True)
    commit(store, windows)
    write_ranking_outputs(store, "tag", True)
    store.write_report({})
    assert all((tmp_path / name).read_text() == f"old {name}\n" for name in FILES)
    store.publish()
    assert results(tmp_path) == reference(windows) and (tmp_path / "notes.txt").read_text() == "mine\n"
    assert json.loads((tmp_path / "report.json").read_text()) == {}


# --------------------------------------------------------------------------- cancel


class CancelAfter(CancelToken):
    """Cancels itself at its n-th check."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.checks = n, 0

    def check(self) -> None:
        self.checks += 1
        if self.checks == self.n:
            self.cancel()
        super().check()


def test_cancel_checks_come_between_windows_and_buckets(tmp_path):
    windows = random_windows(4, n_windows=3)
    store = RunStore(tmp_path, FP, resume=False, restart=False)
    commit(store, windows)
    token = CancelAfter(0)
    write_ranking_outputs(store, "tag", True, token, queries_per_bucket=1)
    buckets = len({ref_clean(r[3]) for w, _ in windows for r in w})
    assert token.checks == 3 + buckets + 3  # pass 1 windows, buckets, rejects windows


@pytest.mark.parametrize("at", ["first window", "last window", "first bucket", "last bucket", "rejects"])
def test_cancelled_finish_resumes_to_identical_files(tmp_path, at):
    windows = random_windows(11, n_windows=4)
    buckets = len({ref_clean(r[3]) for w, _ in windows for r in w})
    n = {"first window": 1, "last window": 4, "first bucket": 5, "last bucket": 4 + buckets,
         "rejects": 4 + buckets + 2}[at]
    for name in FILES:
        (tmp_path / name).write_text("previous run\n")
    store = RunStore(tmp_path, FP, resume=False, restart=False)
    commit(store, windows)
    with pytest.raises(Cancelled):
        write_ranking_outputs(store, "tag", True, CancelAfter(n), queries_per_bucket=1)
    assert all((tmp_path / name).read_text() == "previous run\n" for name in FILES)
    assert not (store.partial / exports.SCRATCH).exists()
    store = RunStore(tmp_path, FP, resume=True, restart=False)
    assert store.windows == 4
    finish(store, queries_per_bucket=1)
    assert results(tmp_path) == reference(windows)


# --------------------------------------------------------------------------- scale

OPEN_FILE_LIMIT_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import pyarrow as pa
    from pipeline.io import exports
    from pipeline.io.store import RunStore

    out, windows = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    exports.QUERIES_PER_BUCKET = 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    try:
        held = [open(sys.argv[2]) for _ in range(64)]
        sys.exit("the open-file limit is not in force")
    except OSError:
        pass
    store = RunStore(out, {}, resume=False, restart=False)
    names = ["row", "file", "line", "qid", "doc_id", "label", "score"]
    types = [pa.int64(), pa.int32(), pa.int64(), pa.string(), pa.string(), pa.float64(), pa.float64()]
    for w, rows in enumerate(windows):
        cols = list(zip(*rows))
        store.commit_window(pa.table([pa.array(list(c), t) for c, t in zip(cols, types)], names=names), [], w + 1, {})
    metrics = exports.write_ranking_outputs(store, "tag", True).metrics
    store.write_report({})
    store.publish()
    print(metrics.queries)
""")


def test_more_buckets_than_open_files_allowed(tmp_path):
    """1,100 buckets (one query each), every window touching every bucket, under a limit of 64
    open files: the TSV writer kept one file per bucket open and failed here."""
    n_queries, n_windows = 1100, 2
    rng = random.Random(0)
    windows = [[(w * n_queries + i, 0, 0, f"q{i}", f"d{rng.randint(0, 9)}", float(rng.randint(0, 2)), rng.random())
                for i in rng.sample(range(n_queries), n_queries)] for w in range(n_windows)]
    data = tmp_path / "windows.json"
    data.write_text(json.dumps(windows))
    r = subprocess.run([sys.executable, "-c", OPEN_FILE_LIMIT_SCRIPT, str(tmp_path / "out"), str(data)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) == n_queries
    want = reference([(rows, []) for rows in windows])
    assert results(tmp_path / "out") == want


@given(st.text())
def test_trec_ids_round_trip_and_hold_no_whitespace(value):
    escaped = trec_id(value)
    assert urllib.parse.unquote(escaped) == value
    assert escaped.split() == ([escaped] if escaped else [])  # one whitespace-free TREC field
    if not any(c.isspace() or c == "%" for c in value):
        assert escaped == value  # other ids are written as read


def test_trec_id_examples():
    assert [trec_id(v) for v in ("a b", "50%", "d1", "x\u3000y", "é")] == ["a%20b", "50%25", "d1", "x%E3%80%80y", "é"]


def test_trec_escaped_rows_are_counted(tmp_path):
    store = RunStore(tmp_path, FP, resume=False, restart=False)
    commit(store, FIXTURE_WINDOWS)
    out = write_ranking_outputs(store, "tag", True, queries_per_bucket=2)
    assert out.trec_escaped_rows == 4  # d 1, both rows of q 3, q 4 (cleaned from q\n4)
