"""Run state of an unfinished run, committed window by window into `OUT/.partial/` (no paddle).

- `part-NNNNNN.parquet`: the window's finished rows, one typed Arrow table as the task gives it
  (the scoring tasks: row, file, line, qid, doc_id, label, score; other tasks other columns,
  list columns included). Top-level string columns are cleaned (tabs and newlines become
  spaces: the final files are TSV) when the part is written.
- `rejects-NNNNNN.parquet`: the window's rejected rows (`REJECT_COLUMNS`), cleaned alike.
- `manifest.json`: how many windows and reader chunks are committed, the run's counters, and a
  fingerprint of inputs, model and settings.

A commit writes the parts first (temporary name, fsync, rename) and then replaces the manifest
the same way, so a run killed at any point resumes from the last manifest (`--resume`); files
written after it belong to no committed window and are removed on resume.

The final files (`FILES`) are built inside `.partial/` (`pipeline.io.exports`, `write_report`)
and moved into OUT together by `publish()`: a failed or interrupted run never leaves a file there
that looks complete, and the previous run's results stay in OUT until then.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from pipeline.io.reader import Reject

__all__ = ["FILES", "MANIFEST", "PARTIAL", "REJECT_COLUMNS", "REJECT_SCHEMA", "ResumeError", "RunStore", "clean",
           "clean_strings"]

PARTIAL = ".partial"
MANIFEST = "manifest.json"
STORE_FORMAT = "parquet-1"  # in the manifest: a run committed in another layout cannot be resumed
FILES = ("predictions.tsv", "rejects.tsv", "ranked.tsv", "run.trec", "report.json", "submission.zip")
REJECT_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("row", pa.int64()), ("qid", pa.string()),
                           ("doc_id", pa.string()), ("reason", pa.string())])
REJECT_COLUMNS = REJECT_SCHEMA.names  # also the column order of rejects.tsv
_MANIFEST_FIELDS = (("windows", int), ("chunks", int), ("rows_committed", int), ("sessions", int),
                    ("tally", dict), ("fingerprint", dict))


class ResumeError(Exception):
    """An unfinished run is in the way, or does not match this one; the message says what to do."""


def clean(s: str) -> str:
    """Fields of our TSV outputs never contain a tab or newline, whatever the input held."""
    return s.replace("\t", " ").replace("\n", " ").replace("\r", " ")


def clean_strings(table: pa.Table) -> pa.Table:
    """`clean` applied to every top-level string column (nested lists are left as they are)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            col = table.column(i)
            for ch in ("\t", "\n", "\r"):
                col = pc.replace_substring(col, ch, " ")
            table = table.set_column(i, field, col)
    return table


def rejects_table(rejects: Sequence[Reject]) -> pa.Table:
    return pa.table({
        "file": [clean(r.file) for r in rejects], "line": [int(r.line) for r in rejects],
        "row": [int(r.row) for r in rejects], "qid": [clean(r.qid) for r in rejects],
        "doc_id": [clean(r.doc_id) for r in rejects], "reason": [clean(r.reason) for r in rejects],
    }, schema=REJECT_SCHEMA)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    """`write(binary file)` into a temporary name, fsync, then rename over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _write_parquet(path: Path, table: pa.Table) -> None:
    _write_atomic(path, lambda f: pq.write_table(table, f, compression="zstd"))


def _manifest_problem(m: object) -> str | None:
    if not isinstance(m, dict):
        return "not a JSON object"
    for key, kind in _MANIFEST_FIELDS:
        value = m.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            return f"{key!r} is missing or of the wrong type"
    return None


class RunStore:
    def __init__(self, out_dir: Path, fingerprint: dict, resume: bool, restart: bool,
                 files: Sequence[str] = FILES):
        self.out_dir = Path(out_dir)
        self.files = tuple(files)  # the final files this run publishes (the task's)
        self.partial = self.out_dir / PARTIAL
        self.fingerprint = fingerprint
        self.rank_seconds = 0.0  # set by the final ranking (pipeline.io.exports)
        if resume:
            manifest = self._load_for_resume()
        elif restart:
            manifest = None
        else:
            manifest = self._peek_manifest()
        if manifest and manifest["windows"] > 0 and not (resume or restart):
            raise ResumeError(
                f"{self.partial} holds an unfinished run ({manifest['rows_committed']} rows committed); "
                f"pass --resume to continue it or --restart to discard it"
            )
        if manifest and resume:
            self.manifest = manifest
            self._remove_uncommitted()
        else:
            if self.partial.exists():
                shutil.rmtree(self.partial)
            self.partial.mkdir(parents=True)
            self.manifest = {"format": STORE_FORMAT, "fingerprint": fingerprint, "windows": 0, "chunks": 0,
                             "rows_committed": 0, "tally": {}, "sessions": 0}
        self.manifest["sessions"] += 1

    # ------------------------------------------------------------------ opening

    def _peek_manifest(self) -> dict | None:
        """The manifest of an unfinished run in the way of a plain run, if any. One that exists but
        cannot be read is refused too: what it protects is unknown, so only --restart discards it."""
        path = self.partial / MANIFEST
        if not path.is_file():
            return None
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
            problem = _manifest_problem(m)
        except (OSError, ValueError) as e:
            problem = str(e)
        if problem:
            raise ResumeError(f"{self.partial} holds an unfinished run whose manifest {path} is unreadable "
                              f"({problem}); pass --restart to discard it and start over")
        return m

    def _load_for_resume(self) -> dict | None:
        """The manifest of the run to resume, checked; None for a run that committed nothing."""
        path = self.partial / MANIFEST
        if not path.is_file():
            if not self.partial.is_dir() or not any(self.partial.iterdir()):
                raise ResumeError(f"there is no unfinished run in {self.out_dir} to resume "
                                  f"(no {PARTIAL}/{MANIFEST}); run without --resume")
            return None  # started, but killed before its first commit: nothing to keep
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ResumeError(f"{path} cannot be read ({e}); pass --restart to discard the unfinished run "
                              f"and start over") from None
        problem = _manifest_problem(m)
        if problem:
            raise ResumeError(f"{path} is corrupt ({problem}); pass --restart to discard the unfinished run "
                              f"and start over")
        if m.get("format") != STORE_FORMAT:
            raise ResumeError(f"{path} was written by another version of the pipeline (committed as "
                              f"{m.get('format', 'TSV parts')!r}, this one reads {STORE_FORMAT!r}); "
                              f"pass --restart to start over")
        if m["fingerprint"] != self.fingerprint:
            diff = sorted(k for k in set(self.fingerprint) | set(m["fingerprint"])
                          if self.fingerprint.get(k) != m["fingerprint"].get(k))
            raise ResumeError(
                f"the unfinished run in {self.partial} was made with other {', '.join(diff)}; "
                f"resume with the same inputs, model and settings, or pass --restart to start over"
            )
        missing = [p.name for w in range(m["windows"]) for p in self._paths(w) if not p.is_file()]
        if missing:
            raise ResumeError(f"{self.partial} lacks committed file {missing[0]} (of {len(missing)} missing); "
                              f"pass --restart to start over")
        return m

    def _paths(self, w: int) -> tuple[Path, Path]:
        return self.partial / f"part-{w:06d}.parquet", self.partial / f"rejects-{w:06d}.parquet"

    def _remove_uncommitted(self) -> None:
        """Everything but the manifest and the committed parts: parts written after the last
        manifest, temporary files, and what an interrupted finish left."""
        keep = {MANIFEST} | {p.name for w in range(self.windows) for p in self._paths(w)}
        for p in self.partial.iterdir():
            if p.name not in keep:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    # ------------------------------------------------------------------ state

    @property
    def windows(self) -> int:
        return self.manifest["windows"]

    @property
    def chunks(self) -> int:
        return self.manifest["chunks"]

    @property
    def resumed(self) -> bool:
        return self.manifest["sessions"] > 1

    # ------------------------------------------------------------------ committing and reading

    def commit_window(self, scored: pa.Table, rejects: Sequence[Reject], chunks: int, tally: dict) -> None:
        """Make one window durable: parts first, then the manifest that points at them."""
        if isinstance(scored, pa.RecordBatch):
            scored = pa.Table.from_batches([scored])
        if not isinstance(scored, pa.Table):
            raise TypeError(f"commit_window takes a pyarrow.Table, got {type(scored).__name__}")
        w = self.windows
        part, rej = self._paths(w)
        _write_parquet(part, clean_strings(scored))
        _write_parquet(rej, rejects_table(rejects))
        self.manifest.update(windows=w + 1, chunks=chunks, tally=tally,
                             rows_committed=self.manifest["rows_committed"] + scored.num_rows + len(rejects))
        text = json.dumps(self.manifest, indent=1).encode("utf-8")
        _write_atomic(self.partial / MANIFEST, lambda f: f.write(text))
        _fsync_dir(self.partial)

    def read_part(self, w: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Committed window `w`'s table (as committed, strings cleaned)."""
        if not 0 <= w < self.windows:
            raise IndexError(f"window {w} is not committed ({self.windows} are)")
        return pq.read_table(self._paths(w)[0], columns=list(columns) if columns is not None else None)

    def read_rejects(self, w: int) -> pa.Table:
        """Committed window `w`'s rejects, sorted by row, columns `REJECT_COLUMNS`."""
        if not 0 <= w < self.windows:
            raise IndexError(f"window {w} is not committed ({self.windows} are)")
        return pq.read_table(self._paths(w)[1])

    # ------------------------------------------------------------------ final files

    def write_report(self, report: dict) -> None:
        p = self.partial
        (p / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        with zipfile.ZipFile(p / "submission.zip", "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(p / "predictions.tsv", "predictions.tsv")
            z.write(p / "report.json", "report.json")

    def publish(self) -> None:
        """Move every final file into OUT (replacing the previous run's), then drop the run state."""
        missing = [name for name in self.files if not (self.partial / name).is_file()]
        if missing:
            raise FileNotFoundError(f"cannot publish: {', '.join(missing)} not built in {self.partial}")
        for name in self.files:
            (self.partial / name).replace(self.out_dir / name)
        shutil.rmtree(self.partial)

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
