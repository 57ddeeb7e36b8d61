"""The scoring run as a stream of chunks: read -> tokenize (worker processes) -> window ->
length-sorted batches -> predictor -> scores -> per-query ranking -> files.

Threads and processes:
- a reader thread reads chunks and hands them to the tokenizer pool (bounded read-ahead, so
  memory does not grow with the input);
- `workers` processes tokenize chunks while the main thread runs the predictor on earlier ones;
- the main thread collects a window of `window_rows` rows, sorts its sequences by length, cuts
  token-budget batches, runs them, restores input order and writes.

paddle is imported only through `create_backend`, so everything else here runs without it.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline import __version__
from pipeline.batching import pad_batch, plan_batches
from pipeline.config import ConfigError, RunConfig, Settings, check_writable, resolve
from pipeline.memory import release_free_memory
from pipeline.modeldir import ModelInfo, TokenizerSettings, load_id_map
from pipeline.reader import Chunk, DatasetReader, InputError, Reject
from pipeline.tokenizer import Encoded, WordPieceTokenizer, fit_pretokenized
from pipeline.writer import FILES, RunStore


class RunError(Exception):
    """The run cannot go on (a tokenizer worker died, ...); the message says why."""


class Backend(Protocol):
    """The engine behind one small interface: a padded batch in, scores or embeddings out.
    `run` may be called from `concurrency` threads at once."""

    concurrency: int

    def run(self, input_ids: np.ndarray, token_type_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


def create_backend(info: ModelInfo, settings: Settings) -> Backend:
    from pipeline.predictor import GpuUnavailable, PaddlePredictor, PredictorSettings

    try:
        return PaddlePredictor(info, PredictorSettings(
            threads=settings.threads_per_stream, streams=settings.streams, device=settings.device, precision=settings.precision,
            tensorrt=settings.tensorrt, trt_varlen=settings.trt_varlen,
            trt_max_seq_len=settings.max_seq_len, trt_max_batch=settings.max_batch_size))
    except GpuUnavailable as e:
        raise ConfigError(str(e)) from e


# ----------------------------------------------------------------------------- tokenizer workers

_TOKENIZER: WordPieceTokenizer | None = None
_ID_MAP: np.ndarray | None = None  # vocabulary-pruned models: full-vocab id -> embedding row


def _init_worker(vocab_file: str, tok: TokenizerSettings, id_map_file: str | None = None) -> None:
    global _TOKENIZER, _ID_MAP
    _TOKENIZER = WordPieceTokenizer(vocab_file, tok)
    _ID_MAP = load_id_map(Path(id_map_file)) if id_map_file else None


def _init_worker_process(parent: int, *args) -> None:
    """A worker process: as `_init_worker`, and exit when the run's process (`parent`) is gone.
    A worker blocked on the task queue never notices on its own when its parent is SIGKILLed (the
    queue's pipe has other holders), and would linger holding memory. The parent's pid comes from
    the parent itself: a worker still booting when the parent died is already orphaned here."""
    if os.getppid() != parent:
        os._exit(1)
    _init_worker(*args)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _apply_id_map(enc: Encoded, unk_id: int) -> int:
    """Pruned models: WordPiece ran on the full vocab; its ids become rows of the pruned table
    here (ids that were not kept become [UNK]). Returns how many tokens fell to [UNK] that way;
    tokens that were [UNK] already are not counted."""
    if _ID_MAP is None:
        return 0
    ids = enc.ids.flat
    if ids.size and int(ids.max()) >= len(_ID_MAP):
        raise ValueError(f"token id {int(ids.max())} is outside the model's {len(_ID_MAP)}-token vocabulary")
    mapped = _ID_MAP[ids]
    enc.ids.flat = mapped
    return int(np.count_nonzero((mapped == _ID_MAP[unk_id]) & (ids != unk_id)))


@dataclass
class TokenizeTask:
    kind: str  # 'pairs' | 'texts' | 'pretokenized'
    max_seq_len: int
    a: list  # queries | texts | input_ids
    b: list | None = None  # docs | None | token_type_ids


@dataclass
class TokenizeResult:
    enc: Encoded  # one sequence per item that did not fail
    failed: dict[int, str]  # item index -> reason
    seconds: float
    truncated: int = 0
    unknown_tokens: int = 0  # pruned models: tokens outside the kept vocabulary, now [UNK]


def tokenize_task(task: TokenizeTask) -> TokenizeResult:
    """Runs in a worker (or inline). A row that makes the tokenizer raise is reported, not fatal."""
    t0 = time.perf_counter()
    tok = _TOKENIZER
    assert tok is not None, "worker not initialised"

    def encode(a, b):
        if task.kind == "pairs":
            enc, cut = tok.encode_pairs(a, b, task.max_seq_len), 0
        elif task.kind == "texts":
            enc, cut = tok.encode_single(a, task.max_seq_len), 0
        else:
            enc, cut = fit_pretokenized(a, b, task.max_seq_len, tok.sep_id)
        return enc, cut, _apply_id_map(enc, tok.unk_id)

    failed: dict[int, str] = {}
    try:
        enc, truncated, unknown = encode(task.a, task.b)
    except Exception:  # find the culprit rows one by one; the others are encoded as usual
        parts, truncated, unknown = [], 0, 0
        for i in range(len(task.a)):
            try:
                e, t, u = encode(task.a[i:i + 1], None if task.b is None else task.b[i:i + 1])
                parts.append(e)
                truncated += t
                unknown += u
            except Exception as ex:  # noqa: BLE001 - any tokenizer failure is a row-level reject
                failed[i] = f"tokenizer error: {type(ex).__name__}: {ex}"
        enc = Encoded.concat(parts)
    return TokenizeResult(enc, failed, time.perf_counter() - t0, truncated, unknown)


def _ready() -> bool:
    return _TOKENIZER is not None


class InlineExecutor:
    """`--workers 0`: tokenize in the reader thread (same results, no processes)."""

    def __init__(self, vocab_file: str, tok: TokenizerSettings, id_map_file: str | None = None):
        _init_worker(vocab_file, tok, id_map_file)

    def submit(self, fn, arg) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(arg))
        except BaseException as e:  # noqa: BLE001 - delivered to the consumer like a worker's error
            f.set_exception(e)
        return f

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


# ----------------------------------------------------------------------------- the reader thread


@dataclass
class Item:
    chunk: Chunk | None  # None when every row of the reader's chunk was rejected
    rejects: list[Reject]
    future: Future | None = None
    text_index: tuple[np.ndarray, np.ndarray] | None = None  # bi: each row's query and doc slot
    texts: list[str] | None = None  # bi: the chunk's distinct texts, in slot order


_END = object()


class ChunkFeeder(threading.Thread):
    """Reads chunks, submits them for tokenization, queues them in input order."""

    def __init__(self, reader: DatasetReader, executor, settings: Settings, depth: int, skip: int = 0):
        super().__init__(daemon=True, name="chunk-feeder")
        self.reader, self.executor, self.settings = reader, executor, settings
        self.skip = skip  # chunks an earlier session committed: read (for counts) but not queued
        self.items: queue.Queue = queue.Queue(maxsize=depth)
        self.read_seconds = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            chunks = self.reader.chunks()
            index = 0
            while not self.stop.is_set():
                t0 = time.perf_counter()
                nxt = next(chunks, None)
                self.read_seconds += time.perf_counter() - t0
                if nxt is None:
                    break
                if index >= self.skip:
                    self._put(self._submit(*nxt))
                index += 1
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            self._put(e)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.items.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _submit(self, chunk: Chunk | None, rejects: list[Reject]) -> Item:
        if chunk is None or len(chunk) == 0:
            return Item(None, rejects)
        s = self.settings
        if chunk.input_ids is not None:
            task = TokenizeTask("pretokenized", s.max_seq_len, chunk.input_ids, chunk.token_type_ids)
            return Item(chunk, rejects, self.executor.submit(tokenize_task, task))
        if s.mode == "cross":
            task = TokenizeTask("pairs", s.max_seq_len, chunk.query, chunk.doc)
            return Item(chunk, rejects, self.executor.submit(tokenize_task, task))
        # bi: every distinct text of the chunk is tokenized once, however many rows use it.
        slots: dict[str, int] = {}
        q_idx = np.fromiter((slots.setdefault(t, len(slots)) for t in chunk.query), np.int64, len(chunk))
        d_idx = np.fromiter((slots.setdefault(t, len(slots)) for t in chunk.doc), np.int64, len(chunk))
        texts = list(slots)
        task = TokenizeTask("texts", s.max_seq_len, texts)
        return Item(chunk, rejects, self.executor.submit(tokenize_task, task), (q_idx, d_idx), texts)


# ----------------------------------------------------------------------------- the run


class Interrupted(RunError):
    """SIGINT/SIGTERM: the run stopped at a batch boundary; committed windows are kept."""


@dataclass
class Tally:
    """Counts and stage times that end in report.json; saved with every committed window so a
    resumed run reports the whole job."""

    rows_scored: int = 0
    rows_rejected: int = 0
    sequences: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    truncated_pretokenized: int = 0
    unknown_tokens: int = 0  # pruned models: tokens of the tokenized sequences outside the kept vocab
    read_seconds: float = 0.0
    tokenize_seconds: float = 0.0
    tokenize_wait_seconds: float = 0.0
    infer_seconds: float = 0.0
    write_seconds: float = 0.0
    per_file: dict[str, dict[str, int]] = field(default_factory=dict)

    def file(self, name: str) -> dict[str, int]:
        return self.per_file.setdefault(name, {"scored": 0, "rejected": 0})

    def to_dict(self) -> dict:
        return asdict(self)


class Scorer:
    """Turns a window of tokenized chunks into one score per row (NaN where a row has none)."""

    def __init__(self, backend: Backend, settings: Settings, pad_id: int, tally: Tally, stop: threading.Event):
        self.backend, self.s, self.pad_id, self.tally, self.stop = backend, settings, pad_id, tally, stop
        self._streams = getattr(backend, "concurrency", 1)  # test doubles may leave it out
        self._pool = ThreadPoolExecutor(self._streams, thread_name_prefix="stream") if self._streams > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _outputs(self, enc: Encoded, batches: list):
        """Backend outputs of `batches` in order. With several streams, up to two batches per
        stream are in flight, so a stream never waits for the main thread."""
        def run_one(batch):
            return self.backend.run(*pad_batch(enc, batch, self.pad_id))

        if self._pool is None:
            for batch in batches:
                if self.stop.is_set():
                    raise Interrupted("interrupted")
                yield run_one(batch)
            return
        ahead = 2 * self._streams
        pending: deque[Future] = deque()
        try:
            for i in range(len(batches)):
                while len(pending) < ahead and i + len(pending) < len(batches):
                    if self.stop.is_set():
                        raise Interrupted("interrupted")
                    pending.append(self._pool.submit(run_one, batches[i + len(pending)]))
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
            wait(pending)  # no stream may still write into a batch the caller has given up on

    def infer(self, enc: Encoded, on_batch) -> np.ndarray:
        """Every sequence of `enc` through the backend in length-sorted batches; outputs in
        `enc`'s order."""
        batches = plan_batches(enc.lengths, self.s.max_batch_tokens, self.s.max_batch_size, self.s.pad_multiple)
        out = None
        t0 = time.perf_counter()
        for batch, res in zip(batches, self._outputs(enc, batches)):
            assert res.shape[0] == len(batch.rows), f"backend returned {res.shape[0]} rows for {len(batch.rows)}"
            if out is None:
                out = np.empty((len(enc),) + res.shape[1:], dtype=res.dtype)
            out[batch.rows] = res
            self.tally.padded_tokens += batch.padded_tokens
            self.tally.batches += 1
            on_batch(len(batch.rows))
        self.tally.infer_seconds += time.perf_counter() - t0
        self.tally.sequences += len(enc)
        self.tally.tokens += int(enc.lengths.sum())
        return out if out is not None else np.empty((0,), dtype=np.float32)

    def score(self, items: list[Item], results: list[TokenizeResult], on_batch) -> list[np.ndarray]:
        if self.s.mode == "cross":
            return self._score_cross(items, results, on_batch)
        return self._score_bi(items, results, on_batch)

    def _score_cross(self, items, results, on_batch) -> list[np.ndarray]:
        scores = self.infer(Encoded.concat([r.enc for r in results]), on_batch).astype(np.float64)
        out, start = [], 0
        for it, r in zip(items, results):
            s = np.full(len(it.chunk), np.nan)
            keep = np.array([i not in r.failed for i in range(len(it.chunk))], dtype=bool)
            s[keep] = scores[start:start + len(r.enc)]
            start += len(r.enc)
            out.append(s)
        return out

    def _score_bi(self, items, results, on_batch) -> list[np.ndarray]:
        """Cosine of query and doc embeddings. Each distinct text of the window is encoded once.
        (No cache across windows: a window's scores then depend only on the window, which keeps
        resumed runs byte-identical to uninterrupted ones.)"""
        slot_of: dict[str, int] = {}
        parts, chunk_slots = [], []
        for item, res in zip(items, results):
            ok = np.array([i not in res.failed for i in range(len(item.texts))], dtype=bool)
            enc_pos = np.cumsum(ok) - 1  # text index in the chunk -> index in res.enc
            slots = np.full(len(item.texts), -1, dtype=np.int64)
            new = []
            for i, text in enumerate(item.texts):
                if ok[i]:
                    slot = slot_of.get(text)
                    if slot is None:
                        slot = slot_of[text] = len(slot_of)
                        new.append(int(enc_pos[i]))
                    slots[i] = slot
            if new:
                idx = np.array(new)
                parts.append(Encoded(res.enc.ids.take(idx), res.enc.types.take(idx)))
            chunk_slots.append(slots)
        table = self.infer(Encoded.concat(parts), on_batch).astype(np.float64)
        out = []
        for item, slots in zip(items, chunk_slots):
            q_idx, d_idx = item.text_index
            qs, ds = slots[q_idx], slots[d_idx]
            valid = (qs >= 0) & (ds >= 0)
            score = np.full(len(q_idx), np.nan)
            score[valid] = np.einsum("ij,ij->i", table[qs[valid]], table[ds[valid]])
            out.append(score)
        return out


def fingerprint(files: list[Path], model: ModelInfo, settings: Settings, cfg: RunConfig) -> dict:
    """What must not change between a run and its resumption (anything that changes results)."""
    res = settings.to_dict()
    for k in ("workers", "progress"):  # do not change results
        res.pop(k)
    return {
        "inputs": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "model": [str(model.path.resolve()), model.checksum],
        "settings": res,
        "columns": asdict(cfg.columns),
        "pipeline_version": __version__,
    }


def run(cfg: RunConfig, model: ModelInfo) -> dict:
    """Score and rank `cfg.inputs` with `model`; returns the report (also written to report.json)."""
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    settings = resolve(cfg, model)
    reader = DatasetReader(cfg.inputs, cfg.columns, chunk_rows=settings.chunk_rows)  # checks every header
    files = reader.files
    if settings.mode == "bi" and reader.pretokenized:
        raise ConfigError("pre-tokenized input holds query-doc pairs, which only --mode cross can score")
    check_writable(cfg.out_dir)
    store = RunStore(cfg.out_dir, fingerprint(files, model, settings, cfg), cfg.resume, cfg.restart)
    for name in FILES:  # stale results of an earlier run must not sit beside this run's
        (cfg.out_dir / name).unlink(missing_ok=True)
    tally = Tally(**store.manifest["tally"]) if store.manifest["tally"] else Tally()
    tok = WordPieceTokenizer(model.vocab_file, model.tokenizer)  # also checks the vocab's special tokens
    id_map = str(model.id_map_file) if model.id_map_file else None  # vocabulary-pruned model
    pad_id = tok.pad_id if id_map is None else int(load_id_map(model.id_map_file)[tok.pad_id])
    if settings.workers > 0:
        executor = ProcessPoolExecutor(settings.workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker_process,
                                       initargs=(os.getpid(), str(model.vocab_file), model.tokenizer, id_map))
        # Start the workers now so that they boot while the predictor loads (~2 s otherwise
        # spent waiting for them on the first chunk).
        warm = [executor.submit(_ready) for _ in range(settings.workers)]
    else:
        executor = InlineExecutor(str(model.vocab_file), model.tokenizer, id_map)
        warm = []
    try:
        backend = create_backend(model, settings)
        for f in warm:
            f.result()
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    stop = threading.Event()
    scorer = Scorer(backend, settings, pad_id, tally, stop)
    chunks_per_window = max(1, settings.window_rows // settings.chunk_rows)
    feeder = ChunkFeeder(reader, executor, settings, depth=chunks_per_window + 2 * max(settings.workers, 1),
                         skip=store.chunks)
    startup_seconds = time.perf_counter() - started
    progress = _progress(settings.progress, initial=store.manifest["rows_committed"])
    read_seconds_before = tally.read_seconds

    def process(window: list[Item], chunks_done: int) -> None:
        t0 = time.perf_counter()
        pending = [it for it in window if it.chunk is not None]
        try:
            results = [it.future.result() for it in pending]
        except BrokenProcessPool as e:
            raise RunError("a tokenizer worker process died (killed or out of memory); committed work is "
                           "kept: rerun with --resume") from e
        tally.tokenize_wait_seconds += time.perf_counter() - t0
        rows = sum(len(it.chunk) for it in pending)
        seqs = sum(len(r.enc) for r in results) or 1
        for r in results:
            tally.tokenize_seconds += r.seconds
            tally.truncated_pretokenized += r.truncated
            tally.unknown_tokens += r.unknown_tokens
        scores = scorer.score(pending, results, lambda n: progress.update(n * rows / seqs))
        t1 = time.perf_counter()
        rejects = [r for it in window for r in it.rejects]
        cols: dict[str, list] = {c: [] for c in ("row", "file", "line", "qid", "doc_id", "label", "score")}
        for it, r, sc in zip(pending, results, scores):
            c = it.chunk
            bad = np.isnan(sc)
            if bad.any():
                reasons = _row_failures(it, r)
                rejects += [Reject(c.file, int(c.line[i]), int(c.row[i]), reasons.get(i, "tokenizer error"),
                                   c.qid[i], c.doc_id[i]) for i in np.flatnonzero(bad)]
            keep = np.flatnonzero(~bad)
            cols["row"].append(c.row[keep])
            cols["file"].append(np.full(len(keep), files_index[c.file], dtype=np.int32))
            cols["line"].append(c.line[keep])
            cols["qid"] += [c.qid[i] for i in keep]
            cols["doc_id"] += [c.doc_id[i] for i in keep]
            cols["label"].append(c.label[keep] if c.label is not None else np.full(len(keep), np.nan))
            cols["score"].append(sc[keep])
            tally.rows_scored += len(keep)
            tally.file(c.file)["scored"] += len(keep)
        for r in rejects:
            tally.rows_rejected += 1
            tally.file(r.file)["rejected"] += 1
        scored = {k: (np.concatenate(v) if k not in ("qid", "doc_id") else v) if v else [] for k, v in cols.items()}
        tally.read_seconds = read_seconds_before + feeder.read_seconds
        tally.write_seconds += time.perf_counter() - t1
        store.commit_window(scored, sorted(rejects, key=lambda r: r.row), chunks_done, tally.to_dict())
        progress.update(len(rejects))
        release_free_memory()

    files_index = {str(f): i for i, f in enumerate(files)}
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for sig in previous:
            signal.signal(sig, lambda *_: stop.set())
    feeder.start()
    try:
        window: list[Item] = []
        window_rows = 0
        chunk_index = store.chunks
        while True:
            try:
                item = feeder.items.get(timeout=0.2)
            except queue.Empty:
                if stop.is_set():
                    raise Interrupted("interrupted") from None
                continue
            if item is _END:
                break
            if isinstance(item, BrokenProcessPool):
                raise RunError("a tokenizer worker process died (killed or out of memory); committed work "
                               "is kept: rerun with --resume") from item
            if isinstance(item, BaseException):
                raise item
            window.append(item)
            chunk_index += 1
            window_rows += len(item.chunk) if item.chunk is not None else 0
            if window_rows >= settings.window_rows:
                process(window, chunk_index)
                window, window_rows = [], 0
        if window:
            process(window, chunk_index)
        progress.close()
        report = _finish(store, cfg, model, settings, reader, tally, files, started_at, startup_seconds, started)
    except BaseException as e:
        progress.close()
        feeder.stop.set()
        if isinstance(e, (InputError, ConfigError)):
            store.discard()  # a file-level problem: nothing worth resuming
        raise
    finally:
        feeder.stop.set()
        scorer.close()
        executor.shutdown(wait=False, cancel_futures=True)
        if in_main:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return report


def _finish(store, cfg, model, settings, reader, tally, files, started_at, startup_seconds, started) -> dict:
    """Rank everything committed and write the final files."""
    t0 = time.perf_counter()
    metrics = store.write_outputs(settings.run_tag, reader.has_label)
    tally.write_seconds += time.perf_counter() - t0 - store.rank_seconds
    report = _report(model, settings, reader, tally, files, metrics.to_dict() if metrics else None, started_at,
                     startup_seconds, store, started)
    store.write_report(report)
    store.publish()
    return report


def _row_failures(item: Item, res: TokenizeResult) -> dict[int, str]:
    """Reasons for rows whose sequence could not be built (cross: by row; bi: by text)."""
    if item.texts is None:
        return dict(res.failed)
    q_idx, d_idx = item.text_index
    out = {}
    for i in range(len(q_idx)):
        for slot, what in ((q_idx[i], "query"), (d_idx[i], "doc")):
            if slot in res.failed:
                out[i] = f"{what}: {res.failed[slot]}"
    return out


def _report(model, settings, reader, tally, files, metrics, started_at, startup_s, store, started) -> dict:
    per_file = []
    for f in files:
        name = str(f)
        t = tally.per_file.get(name, {"scored": 0, "rejected": 0})
        per_file.append({"file": name, "rows_read": reader.counts[name].rows_read, "rows_scored": t["scored"],
                         "rows_rejected": t["rejected"]})
    total_s = time.perf_counter() - started
    processing_s = total_s - startup_s
    return {
        "pipeline_version": __version__,
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sessions": store.manifest["sessions"],
        "inputs": [str(f) for f in files],
        "rows": {"read": sum(p["rows_read"] for p in per_file), "scored": tally.rows_scored,
                 "rejected": tally.rows_rejected},
        "files": per_file,
        "tokens": {
            "sequences": tally.sequences,
            "real": tally.tokens,
            "padded": tally.padded_tokens,
            "padding_overhead": (tally.padded_tokens / tally.tokens - 1.0) if tally.tokens else 0.0,
            "batches": tally.batches,
            "truncated_pretokenized": tally.truncated_pretokenized,
            "unknown_tokens": tally.unknown_tokens,
        },
        "seconds": {
            "startup": startup_s,
            "read": tally.read_seconds,
            "tokenize": tally.tokenize_seconds,
            "tokenize_wait": tally.tokenize_wait_seconds,
            "infer": tally.infer_seconds,
            "rank": store.rank_seconds,
            "write": tally.write_seconds,
            "total": total_s,
        },
        "rows_per_second": tally.rows_scored / processing_s if processing_s > 0 else 0.0,
        "tokens_per_second": tally.tokens / processing_s if processing_s > 0 else 0.0,
        "settings": settings.to_dict(),
        "model": {
            "name": model.name, "path": str(model.path), "mode": model.mode, "pooling": model.pooling,
            "precision": model.precision, "checksum": model.checksum, "source_sha256": model.source_sha256,
            "pruned_ids_kept": model.raw["pruning"]["ids_kept"] if model.id_map_file else None,
        },
        "metrics": metrics,
    }


class _NoProgress:
    def update(self, n: float) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, initial: int = 0):
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(unit="rows", initial=initial, smoothing=0.1, dynamic_ncols=True,
                bar_format="{desc}{n:.0f} rows [{elapsed}, {rate_fmt}]")
