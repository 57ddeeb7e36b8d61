"""Runs that survive: SIGKILL at several points then --resume gives byte-identical files,
SIGINT stops cleanly and resumably, a dead tokenizer worker ends the run with a clear error,
a tokenizer exception on one row rejects only that row."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT
from tests.sample_data import sample_rows as _sample_rows, write_tsv as _write_tsv

RESULT_FILES = ("predictions.tsv", "ranked.tsv", "run.trec", "rejects.tsv")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = _sample_rows(40)  # ~1,200 pairs
    return _write_tsv(tmp_path_factory.mktemp("resume") / "pairs.tsv", rows,
                      extra_lines=["qBAD\t\tdBAD\tdoc\t1"])  # one reject, to check rejects survive too


def _cmd(data, model, out, *extra):
    return [sys.executable, "-m", "pipeline", "run", str(data), "--model", str(model), "--out", str(out),
            "--no-progress", "--chunk-rows", "50", "--window-rows", "100", "--threads", "1", *extra]


def _windows(out: Path) -> int:
    try:
        return json.loads((out / ".partial" / "manifest.json").read_text())["windows"]
    except (OSError, ValueError, KeyError):
        return 0


def _start(cmd):
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_windows(proc, out, n, timeout=120):
    deadline = time.time() + timeout
    while _windows(out) < n:
        assert proc.poll() is None, f"run ended before {n} windows: {proc.communicate()}"
        assert time.time() < deadline, "no progress"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(data, tiny_cross_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    subprocess.run(_cmd(data, tiny_cross_dir, out, "--workers", "1"), cwd=REPO_ROOT, check=True, capture_output=True)
    return out


def _same_results(a: Path, b: Path) -> None:
    for name in RESULT_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert ra["rows"] == rb["rows"] and ra["files"] == rb["files"] and ra["tokens"] == rb["tokens"]
    assert ra["metrics"] == rb["metrics"]


def test_same_input_and_settings_give_identical_files(data, tiny_cross_dir, reference, tmp_path):
    out = tmp_path / "again"
    subprocess.run(_cmd(data, tiny_cross_dir, out, "--workers", "1"), cwd=REPO_ROOT, check=True, capture_output=True)
    _same_results(reference, out)


@pytest.mark.parametrize("kill_after_windows", [0, 1, 7])
def test_sigkill_then_resume_is_byte_identical(data, tiny_cross_dir, reference, tmp_path, kill_after_windows):
    out = tmp_path / "out"
    proc = _start(_cmd(data, tiny_cross_dir, out, "--workers", "1"))
    if kill_after_windows:
        _wait_for_windows(proc, out, kill_after_windows)
        workers = _workers(proc.pid)
    else:  # during start-up, once the tokenizer worker exists and before any commit
        workers = _wait_for_workers(proc, 1)
        assert _windows(out) == 0
    assert workers, "the run has no tokenizer worker to check"
    proc.kill()
    proc.wait()
    assert not (out / "report.json").exists()
    deadline = time.time() + 5  # tokenizer workers notice their parent is gone and exit
    while any(Path(f"/proc/{k}").exists() and b"zombie" not in _state(k) for k in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [k for k in workers if Path(f"/proc/{k}").exists() and b"zombie" not in _state(k)]
    # a part written after the last manifest (a kill between the two) must be ignored
    partial = out / ".partial"
    if partial.exists():
        (partial / "part-999999.parquet").write_text("garbage\n")
    # without --resume the unfinished run is protected
    if _windows(out) > 0:
        r = subprocess.run(_cmd(data, tiny_cross_dir, out), cwd=REPO_ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and "--resume" in r.stderr
    r = subprocess.run(_cmd(data, tiny_cross_dir, out, "--resume", "--workers", "2"), cwd=REPO_ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _same_results(reference, out)
    assert not partial.exists()


def test_resume_refuses_other_settings(data, tiny_cross_dir, tmp_path):
    out = tmp_path / "out"
    proc = _start(_cmd(data, tiny_cross_dir, out))
    _wait_for_windows(proc, out, 1)
    proc.kill()
    proc.wait()
    r = subprocess.run(_cmd(data, tiny_cross_dir, out, "--resume", "--max-batch-size", "3"), cwd=REPO_ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "settings" in r.stderr and "--restart" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_quickly_and_resumes(data, tiny_cross_dir, reference, tmp_path, sig):
    out = tmp_path / "out"
    proc = _start(_cmd(data, tiny_cross_dir, out, "--workers", "1"))
    _wait_for_windows(proc, out, 2)
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 5
    assert proc.returncode == 130
    assert "--resume" in err and "Traceback" not in err
    assert _windows(out) >= 2 and not (out / "ranked.tsv").exists()
    r = subprocess.run(_cmd(data, tiny_cross_dir, out, "--resume"), cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _same_results(reference, out)


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes().lower()
    except OSError:
        return b"zombie"


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def _workers(pid: int) -> list[int]:
    """The run's tokenizer worker processes (spawned multiprocessing children, not the resource tracker)."""
    out = []
    for k in _children(pid):
        try:
            cmd = Path(f"/proc/{k}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
            out.append(k)
    return out


def _wait_for_workers(proc, n: int, timeout: float = 60) -> list[int]:
    deadline = time.time() + timeout
    while len(found := _workers(proc.pid)) < n:
        assert proc.poll() is None, f"run ended before {n} workers started: {proc.communicate()}"
        assert time.time() < deadline, "no tokenizer worker started"
        time.sleep(0.01)
    return found


def test_interrupting_concurrent_streams_resumes_identically(data, tiny_cross_dir, reference, tmp_path):
    """Two predictor streams with batches in flight when SIGINT arrives: the run stops at once,
    and resuming with the same settings gives the single-stream reference's bytes (each stream
    has one thread, as the reference does)."""
    out = tmp_path / "out"
    streams = ("--workers", "1", "--threads", "2", "--streams", "2")
    proc = _start(_cmd(data, tiny_cross_dir, out, *streams))
    _wait_for_windows(proc, out, 2)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 5 and proc.returncode == 130, err
    assert "Traceback" not in err
    r = subprocess.run(_cmd(data, tiny_cross_dir, out, *streams, "--resume"), cwd=REPO_ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    _same_results(reference, out)


def test_dead_tokenizer_worker_ends_the_run_clearly(data, tiny_cross_dir, reference, tmp_path):
    out = tmp_path / "out"
    proc = _start(_cmd(data, tiny_cross_dir, out, "--workers", "1"))
    _wait_for_windows(proc, out, 1)
    workers = _workers(proc.pid)
    assert workers, "no tokenizer worker found"
    for k in workers:
        os.kill(k, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    # The reader reads only a few chunks ahead, so work was still pending when the worker died.
    assert proc.returncode == 2, err
    assert "tokenizer worker" in err and "--resume" in err and "Traceback" not in err
    r = subprocess.run(_cmd(data, tiny_cross_dir, out, "--resume"), cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _same_results(reference, out)


def test_tokenizer_exception_rejects_only_that_row(tiny_cross_dir, tmp_path, monkeypatch):
    from pipeline.engine import tokenizer
    from pipeline.cli import main

    rows = _sample_rows(2)
    poison = rows[3]["doc"]
    original = tokenizer.WordPieceTokenizer.token_ids

    def token_ids(self, texts, max_tokens):
        if poison in texts:
            raise RuntimeError("boom")
        return original(self, texts, max_tokens)

    monkeypatch.setattr(tokenizer.WordPieceTokenizer, "token_ids", token_ids)
    data = _write_tsv(tmp_path / "in.tsv", rows)
    out = tmp_path / "out"
    assert main(["run", str(data), "--model", str(tiny_cross_dir), "--out", str(out), "--no-progress",
                 "--workers", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == {"read": len(rows), "scored": len(rows) - 1, "rejected": 1}
    rejects = (out / "rejects.tsv").read_text().splitlines()
    assert len(rejects) == 2 and "boom" in rejects[1] and rows[3]["doc_id"] in rejects[1]
