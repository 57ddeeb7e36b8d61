"""One run of a task over files (no paddle here; the engine imports it):

    reader thread -> tokenizer pool -> engine (through the task) -> store -> final files

Windows of `window_rows` rows are committed one by one (`pipeline.io.store`), so a run killed at
any point resumes from the last committed window. Cancellation comes from outside through a
`CancelToken` (the CLI turns Ctrl-C and SIGTERM into one; a library caller or a Ray driver
calls `cancel()`), and stops the batch loop and the final ranking alike.
"""

from __future__ import annotations

import json
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from functools import partial
from pathlib import Path

from pipeline import __version__
from pipeline.cancel import CancelToken
from pipeline.config import ConfigError, RunConfig, Settings, cache_dir, check_writable, resolve
from pipeline.engine.cpu import CpuFeatures, OnednnIsa
from pipeline.engine.engine import Backend, BackendUnavailable
from pipeline.engine.modeldir import ModelInfo
from pipeline.io.qrels import read_qrels
from pipeline.io.reader import InputError
from pipeline.io.row_texts import read_row_texts
from pipeline.io.store import RunStore
from pipeline.job.feeder import WORKER_DIED, ChunkFeeder, RunError
from pipeline.job.report import Tally, Timing, build_report, progress_bar
from pipeline.job.workers import TokenizerPool
from pipeline.memory import release_free_memory
from pipeline.tasks import check_input, get_task
from pipeline.tasks.base import FinishSpec, InputSpec, Item, Task

__all__ = ["RunError", "fingerprint", "run"]


def fingerprint(files: list[Path], model: ModelInfo, settings: Settings, cfg: RunConfig) -> dict:
    """What must not change between a run and its resumption (anything that changes results).
    `files`: every file the rows come from (a reranking run's queries and corpus too)."""
    res = settings.to_dict()
    for k in ("workers", "progress"):  # do not change results
        res.pop(k)
    fp = {
        "inputs": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "rerank_depth": cfg.rerank.depth if cfg.rerank else None,
        "model": [str(model.path.resolve()), model.checksum],
        "settings": res,
        "columns": asdict(cfg.columns),
        "pipeline_version": __version__,
    }
    return json.loads(json.dumps(fp))  # as the manifest holds it (tuples become lists), to compare with it


def run(cfg: RunConfig, model: ModelInfo, cancel: CancelToken | None = None, backend: Backend | None = None) -> dict:
    """Run `model`'s task over `cfg.inputs`; returns the report (also written to report.json).
    `backend` replaces the Paddle predictor (tests)."""
    cancel, timing = cancel or CancelToken(), Timing()
    settings = resolve(cfg, model)
    task = get_task(settings.mode)
    cpu = cfg.cpu or CpuFeatures.detect()
    # oneDNN's own word on the ISA it runs (a subprocess, cached per machine kind; not with a
    # test backend or on the GPU)
    probe = backend is None and settings.device == "cpu" and task.model_output != "tokens"
    isa = OnednnIsa(model.path, cpu, cache_dir()) if probe else None
    reader = task.open_reader(InputSpec(cfg.inputs, cfg.columns, settings.chunk_rows, settings.tsv_quoting,
                                        cfg.rerank, cache_dir() / "corpus-index"))  # checks every header
    check_input(task, reader)
    judgements = read_qrels(cfg.qrels) if cfg.qrels else None  # a bad qrels file fails before any work
    check_writable(cfg.out_dir)
    row_files = list(reader.files) + ([Path(cfg.rerank.queries), Path(cfg.rerank.corpus)] if cfg.rerank else [])
    store = RunStore(cfg.out_dir, fingerprint(row_files, model, settings, cfg), cfg.resume, cfg.restart,
                     task.output_files)
    tally = Tally(**store.manifest["tally"]) if store.manifest["tally"] else Tally()
    pool = feeder = None
    try:
        pool = TokenizerPool(task.encoder_spec(model, settings), settings.workers)
        chunks_per_window = max(1, settings.window_rows // settings.chunk_rows)
        feeder = ChunkFeeder(reader, pool, task, settings.max_seq_len,
                             depth=chunks_per_window + 2 * max(settings.workers, 1), skip=store.chunks)
        feeder.start()  # the workers boot and tokenize the first window while the predictor loads
        with task.open_engine(model, settings, backend, pool) as engine:
            timing.startup = time.perf_counter() - timing.started
            _score_windows(task, engine, feeder, store, settings, tally, cancel)
        t0 = time.perf_counter()
        sections = task.finish(store, FinishSpec(settings.run_tag, reader.has_label, judgements, settings.recall_k,
                                                 row_texts=partial(read_row_texts, reader)), cancel)
        timing.rank = store.rank_seconds
        tally.write_seconds += time.perf_counter() - t0 - timing.rank
        rows_read = {name: count.rows_read for name, count in reader.counts.items()}
        report = build_report(task.name, model, settings.to_dict(), reader.files, rows_read, tally, sections, timing,
                              store.manifest["sessions"], _input_report(reader, cfg, judgements))
        report["precision"] = {"used": settings.precision, "reason": settings.precision_reason,
                               "cpu": {**cpu.to_dict(), "onednn_isa": isa.result() if isa else None}}
        store.write_report(report)
        store.publish()
        from pipeline.job.report_page import write_page  # matplotlib: imported only when a run has finished

        write_page(cfg.out_dir)  # from the published files, as `pipeline report OUT` rebuilds it
    except (InputError, ConfigError, BackendUnavailable):
        store.discard()  # a file-level or settings problem: nothing worth resuming
        raise
    finally:
        if feeder is not None:
            feeder.stop.set()
        if pool is not None:
            pool.shutdown()
    return report


def _input_report(reader, cfg: RunConfig, judgements) -> dict:
    """What report.json says about how the inputs were read: the TSV quoting rule of each TSV
    file, the reranking layout's files, where the judgements came from."""
    out: dict = {"tsv_quoting": {name: asdict(q) for name, q in reader.quoting.items()}}
    if cfg.rerank is not None:
        out["rerank"] = reader.layout_report()
    if judgements is not None:
        out["judgements"] = {"source": "qrels", "file": str(cfg.qrels), **judgements.summary()}
    elif reader.has_label:
        out["judgements"] = {"source": "labels"}
    return out


def _score_windows(task: Task, engine, feeder: ChunkFeeder, store: RunStore, settings: Settings,
                   tally: Tally, cancel: CancelToken) -> None:
    if task.progress_unit == "tokens":
        progress = progress_bar(settings.progress, initial=int(tally.counters.get("generated_tokens", 0)), unit="tokens")
    else:
        progress = progress_bar(settings.progress, initial=store.manifest["rows_committed"])
    file_index = {str(f): i for i, f in enumerate(feeder.reader.files)}
    read_before = tally.read_seconds
    session = store.manifest["sessions"]
    last = time.perf_counter()
    try:
        for window, chunks_done in feeder.windows(settings.window_rows, cancel):
            tally.read_seconds = read_before + feeder.read_seconds
            _commit_window(task, engine, store, window, chunks_done, file_index, tally, cancel, progress,
                           lambda rows, tokens: tally.add_window(time.perf_counter() - last, rows, tokens, session))
            last = time.perf_counter()
    finally:
        progress.close()


def _commit_window(task: Task, engine, store: RunStore, window: list[Item], chunks_done: int,
                   file_index: dict[str, int], tally: Tally, cancel: CancelToken, progress, on_done) -> None:
    t0 = time.perf_counter()
    pending = [it for it in window if it.chunk is not None]
    try:
        results = [it.future.result() for it in pending]
    except BrokenProcessPool as e:
        raise RunError(WORKER_DIED) from e
    tally.tokenize_wait_seconds += time.perf_counter() - t0
    tally.add_tokenized(results)
    rows, seqs = sum(len(it.chunk) for it in pending), sum(r.sequences for r in results) or 1
    by_rows = task.progress_unit == "rows"
    try:
        out = task.process(engine, window, results, file_index, cancel,
                           (lambda n: progress.update(n * rows / seqs)) if by_rows else progress.update)
    except BrokenProcessPool as e:  # a task that uses the pool itself (generation detokenizes there)
        raise RunError(WORKER_DIED) from e
    t1 = time.perf_counter()
    tally.add_batches(out.stats)
    tally.rows_scored += out.table.num_rows
    for name, v in out.counters.items():
        tally.counters[name] = tally.counters.get(name, 0) + v
    for name, n in out.per_file.items():
        tally.file(name)["scored"] += n
    for r in out.rejects:
        tally.rows_rejected += 1
        tally.file(r.file)["rejected"] += 1
    tally.write_seconds += time.perf_counter() - t1
    on_done(out.table.num_rows + len(out.rejects),
            int(out.counters.get("generated_tokens", 0)) if task.progress_unit == "tokens" else out.stats.tokens)
    store.commit_window(out.table, out.rejects, chunks_done, tally.to_dict())
    if by_rows:
        progress.update(len(out.rejects))
    release_free_memory()
