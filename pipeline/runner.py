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
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline import __version__
from pipeline.batching import pad_batch, plan_batches
from pipeline.config import RunConfig, Settings, check_writable, resolve
from pipeline.modeldir import ModelInfo, TokenizerSettings
from pipeline.ranking import rank_per_query, ranking_metrics
from pipeline.reader import Chunk, DatasetReader, Reject, list_input_files
from pipeline.tokenizer import Encoded, WordPieceTokenizer, fit_pretokenized
from pipeline.writer import FILES, OutputWriter


class RunError(Exception):
    """The run cannot go on (a tokenizer worker died, ...); the message says why."""


class Backend(Protocol):
    """The engine behind one small interface: a padded batch in, scores or embeddings out."""

    def run(self, input_ids: np.ndarray, token_type_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


def create_backend(info: ModelInfo, settings: Settings) -> Backend:
    from pipeline.predictor import PaddlePredictor, PredictorSettings

    return PaddlePredictor(info, PredictorSettings(threads=settings.threads))


# ----------------------------------------------------------------------------- tokenizer workers

_TOKENIZER: WordPieceTokenizer | None = None


def _init_worker(vocab_file: str, tok: TokenizerSettings) -> None:
    global _TOKENIZER
    _TOKENIZER = WordPieceTokenizer(vocab_file, tok)


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


def tokenize_task(task: TokenizeTask) -> TokenizeResult:
    """Runs in a worker (or inline). A row that makes the tokenizer raise is reported, not fatal."""
    t0 = time.perf_counter()
    tok = _TOKENIZER
    assert tok is not None, "worker not initialised"

    def encode(a, b):
        if task.kind == "pairs":
            return tok.encode_pairs(a, b, task.max_seq_len), 0
        if task.kind == "texts":
            return tok.encode_single(a, task.max_seq_len), 0
        return fit_pretokenized(a, b, task.max_seq_len, tok.sep_id)

    failed: dict[int, str] = {}
    try:
        enc, truncated = encode(task.a, task.b)
    except Exception:  # find the culprit rows one by one; the others are encoded as usual
        parts, truncated = [], 0
        for i in range(len(task.a)):
            try:
                e, t = encode(task.a[i:i + 1], None if task.b is None else task.b[i:i + 1])
                parts.append(e)
                truncated += t
            except Exception as ex:  # noqa: BLE001 - any tokenizer failure is a row-level reject
                failed[i] = f"tokenizer error: {type(ex).__name__}: {ex}"
        enc = Encoded.concat(parts)
    return TokenizeResult(enc, failed, time.perf_counter() - t0, truncated)


class InlineExecutor:
    """`--workers 0`: tokenize in the reader thread (same results, no processes)."""

    def __init__(self, vocab_file: str, tok: TokenizerSettings):
        _init_worker(vocab_file, tok)

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
    chunk: Chunk | None
    rejects: list[Reject]
    future: Future | None = None
    text_index: tuple[np.ndarray, np.ndarray] | None = None  # bi: each row's query and doc slot
    texts: list[str] | None = None  # bi: the chunk's distinct texts, in slot order


_END = object()


class ChunkFeeder(threading.Thread):
    """Reads chunks, submits them for tokenization, queues them in input order."""

    def __init__(self, reader: DatasetReader, executor, settings: Settings, depth: int):
        super().__init__(daemon=True, name="chunk-feeder")
        self.reader, self.executor, self.settings = reader, executor, settings
        self.items: queue.Queue = queue.Queue(maxsize=depth)
        self.read_seconds = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            chunks = self.reader.chunks()
            while not self.stop.is_set():
                t0 = time.perf_counter()
                nxt = next(chunks, None)
                self.read_seconds += time.perf_counter() - t0
                if nxt is None:
                    break
                self._put(self._submit(*nxt))
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


@dataclass
class Tally:
    """Counts and stage times that end in report.json."""

    rows_scored: int = 0
    rows_rejected: int = 0
    sequences: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    truncated_pretokenized: int = 0
    tokenize_seconds: float = 0.0
    tokenize_wait_seconds: float = 0.0
    infer_seconds: float = 0.0
    write_seconds: float = 0.0
    per_file: dict[str, dict[str, int]] = field(default_factory=dict)

    def file(self, name: str) -> dict[str, int]:
        return self.per_file.setdefault(name, {"scored": 0, "rejected": 0})


class Scorer:
    """Turns a window of tokenized chunks into one score per accepted row."""

    def __init__(self, backend: Backend, settings: Settings, pad_id: int, tally: Tally):
        self.backend, self.s, self.pad_id, self.tally = backend, settings, pad_id, tally
        self.embeddings: OrderedDict[str, np.ndarray] = OrderedDict()  # bi: text -> embedding

    def infer(self, enc: Encoded, on_batch=None) -> np.ndarray:
        """Run every sequence of `enc` through the backend in length-sorted batches; outputs
        come back in `enc`'s order."""
        batches = plan_batches(enc.lengths, self.s.max_batch_tokens, self.s.max_batch_size, self.s.pad_multiple)
        out = None
        for batch in batches:
            arrays = pad_batch(enc, batch, self.pad_id)
            t0 = time.perf_counter()
            res = self.backend.run(*arrays)
            self.tally.infer_seconds += time.perf_counter() - t0
            assert res.shape[0] == len(batch.rows), f"backend returned {res.shape[0]} rows for a batch of {len(batch.rows)}"
            if out is None:
                out = np.empty((len(enc),) + res.shape[1:], dtype=res.dtype)
            out[batch.rows] = res
            self.tally.padded_tokens += batch.padded_tokens
            self.tally.batches += 1
            if on_batch:
                on_batch(len(batch.rows))
        self.tally.sequences += len(enc)
        self.tally.tokens += int(enc.lengths.sum())
        return out if out is not None else np.empty(0, dtype=np.float32)

    def score_cross(self, encs: list[Encoded], on_batch) -> list[np.ndarray]:
        scores = self.infer(Encoded.concat(encs), on_batch).astype(np.float64)
        bounds = np.cumsum([0] + [len(e) for e in encs])
        return [scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def score_bi(self, items: list[Item], results: list[TokenizeResult], on_batch) -> list[np.ndarray]:
        """Cosine of query and doc embeddings; each distinct text is encoded once per window
        and reused from the embedding cache across windows."""
        slot_of: dict[str, int] = {}  # window-wide distinct text -> row of `table`
        known: list[np.ndarray] = []
        todo_parts, todo_slots = [], []
        chunk_slots = []
        for item, res in zip(items, results):
            ok = np.array([i not in res.failed for i in range(len(item.texts))], dtype=bool)
            enc_pos = np.cumsum(ok) - 1  # item text index -> index in res.enc
            slots = np.full(len(item.texts), -1, dtype=np.int64)
            new_local = []
            for i, text in enumerate(item.texts):
                if not ok[i]:
                    continue
                slot = slot_of.get(text)
                if slot is None:
                    slot = slot_of[text] = len(slot_of)
                    cached = self.embeddings.get(text)
                    if cached is not None:
                        self.embeddings.move_to_end(text)
                        known.append((slot, cached))
                    else:
                        new_local.append(int(enc_pos[i]))
                        todo_slots.append(slot)
                slots[i] = slot
            if new_local:
                todo_parts.append(Encoded(res.enc.ids.take(np.array(new_local)), res.enc.types.take(np.array(new_local))))
            chunk_slots.append(slots)
        computed = self.infer(Encoded.concat(todo_parts), on_batch)
        dim = computed.shape[1] if computed.ndim == 2 else (known[0][1].shape[0] if known else 0)
        table = np.zeros((len(slot_of), dim), dtype=np.float32)
        for slot, vec in known:
            table[slot] = vec
        if len(todo_slots):
            table[np.array(todo_slots)] = computed
        if self.s.embedding_cache:
            texts_by_slot = list(slot_of)
            for slot in todo_slots:
                self.embeddings[texts_by_slot[slot]] = table[slot]
            while len(self.embeddings) > self.s.embedding_cache:
                self.embeddings.popitem(last=False)
        out = []
        for item, slots in zip(items, chunk_slots):
            q_idx, d_idx = item.text_index
            qs, ds = slots[q_idx], slots[d_idx]
            valid = (qs >= 0) & (ds >= 0)
            score = np.full(len(q_idx), np.nan)
            score[valid] = np.einsum("ij,ij->i", table[qs[valid]].astype(np.float64), table[ds[valid]].astype(np.float64))
            out.append(score)
        return out


def run(cfg: RunConfig, model: ModelInfo, log=print) -> dict:
    """Score and rank `cfg.inputs` with `model`; returns the report (also written to report.json)."""
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    settings = resolve(cfg, model)
    files = list_input_files(cfg.inputs)
    check_writable(cfg.out_dir)
    reader = DatasetReader(files, cfg.columns, chunk_rows=settings.chunk_rows)
    if settings.mode == "bi" and reader.pretokenized:
        from pipeline.config import ConfigError

        raise ConfigError("pre-tokenized input holds query-doc pairs, which only --mode cross can score")
    backend = create_backend(model, settings)
    tok = WordPieceTokenizer(model.vocab_file, model.tokenizer)  # also checks the vocab's special tokens
    if settings.workers > 0:
        executor = ProcessPoolExecutor(settings.workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(str(model.vocab_file), model.tokenizer))
    else:
        executor = InlineExecutor(str(model.vocab_file), model.tokenizer)
    for name in FILES:  # stale results of an earlier run must not sit beside this run's
        (cfg.out_dir / name).unlink(missing_ok=True)
    writer = OutputWriter(cfg.out_dir)
    tally = Tally()
    scorer = Scorer(backend, settings, tok.pad_id, tally)
    chunks_per_window = max(1, settings.window_rows // settings.chunk_rows)
    feeder = ChunkFeeder(reader, executor, settings, depth=chunks_per_window + 2 * max(settings.workers, 1))
    startup_seconds = time.perf_counter() - started
    acc_qid, acc_doc, acc_label, acc_score = [], [], [], []
    progress = _progress(settings.progress)

    def process(window: list[Item]) -> None:
        t0 = time.perf_counter()
        try:
            results = [it.future.result() for it in window]
        except BrokenProcessPool as e:
            raise RunError("a tokenizer worker process died (killed or out of memory); the run stopped") from e
        tally.tokenize_wait_seconds += time.perf_counter() - t0
        rows = sum(len(it.chunk) for it in window)
        seqs = sum(len(r.enc) for r in results) or 1
        on_batch = lambda n: progress.update(n * rows / seqs)  # noqa: E731 - progress in rows
        for r in results:
            tally.tokenize_seconds += r.seconds
            tally.truncated_pretokenized += r.truncated
        if settings.mode == "cross":
            scores = scorer.score_cross([r.enc for r in results], on_batch)
            # failed rows have no sequence: spread the scores back over the chunk's rows
            full = []
            for it, r, sc in zip(window, results, scores):
                s = np.full(len(it.chunk), np.nan)
                keep = np.array([i not in r.failed for i in range(len(it.chunk))], dtype=bool)
                s[keep] = sc
                full.append(s)
            scores = full
        else:
            scores = scorer.score_bi(window, results, on_batch)
        t1 = time.perf_counter()
        for it, r, sc in zip(window, results, scores):
            c = it.chunk
            bad = np.isnan(sc)
            if bad.any():
                reasons = _row_failures(it, r)
                rej = [Reject(c.file, int(c.line[i]), int(c.row[i]), reasons.get(i, "tokenizer error"), c.qid[i], c.doc_id[i])
                       for i in np.flatnonzero(bad)]
                writer.write_rejects(rej)
                tally.rows_rejected += len(rej)
                tally.file(c.file)["rejected"] += len(rej)
            keep = np.flatnonzero(~bad)
            qid = np.array(c.qid, dtype=object)[keep]
            label = c.label[keep] if c.label is not None else np.full(len(keep), np.nan)
            writer.write_predictions(list(qid), label, sc[keep])
            acc_qid.append(qid)
            acc_doc.append(np.array(c.doc_id, dtype=object)[keep])
            acc_label.append(label)
            acc_score.append(sc[keep])
            tally.rows_scored += len(keep)
            tally.file(c.file)["scored"] += len(keep)
        tally.write_seconds += time.perf_counter() - t1

    feeder.start()
    try:
        window: list[Item] = []
        window_rows = 0
        while True:
            item = feeder.items.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            if item.rejects:
                writer.write_rejects(item.rejects)
                tally.rows_rejected += len(item.rejects)
                for r in item.rejects:
                    tally.file(r.file)["rejected"] += 1
            if item.chunk is not None:
                window.append(item)
                window_rows += len(item.chunk)
            if window_rows >= settings.window_rows:
                process(window)
                window, window_rows = [], 0
        if window:
            process(window)
        progress.close()

        t0 = time.perf_counter()
        qid = np.concatenate(acc_qid) if acc_qid else np.array([], dtype=object)
        doc = np.concatenate(acc_doc) if acc_doc else np.array([], dtype=object)
        label = np.concatenate(acc_label) if acc_label else np.array([], dtype=np.float64)
        score = np.concatenate(acc_score) if acc_score else np.array([], dtype=np.float64)
        order, rank = rank_per_query(qid, doc, score)
        metrics = None
        if reader.has_label and len(label) and not np.all(np.isnan(label)):
            metrics = ranking_metrics(qid, doc, label, score).to_dict()
        rank_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        writer.write_ranking(qid, doc, score, order, rank, settings.run_tag)
        tally.write_seconds += time.perf_counter() - t0

        report = _report(cfg, model, settings, reader, tally, files, metrics, started_at, startup_seconds,
                         feeder.read_seconds, rank_seconds, time.perf_counter() - started)
        writer.write_report(report)
        writer.commit()
    except BaseException:
        progress.close()
        feeder.stop.set()
        writer.abort()
        raise
    finally:
        feeder.stop.set()
        executor.shutdown(wait=False, cancel_futures=True)
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


def _report(cfg, model, settings, reader, tally, files, metrics, started_at, startup_s, read_s, rank_s, total_s) -> dict:
    counts = reader.counts
    per_file = []
    for f in files:
        name = str(f)
        c = counts.get(name)
        t = tally.per_file.get(name, {"scored": 0, "rejected": 0})
        per_file.append({"file": name, "rows_read": c.rows_read if c else 0, "rows_scored": t["scored"],
                         "rows_rejected": t["rejected"]})
    rows_read = sum(p["rows_read"] for p in per_file)
    processing_s = total_s - startup_s
    return {
        "pipeline_version": __version__,
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": [str(f) for f in files],
        "rows": {"read": rows_read, "scored": tally.rows_scored, "rejected": tally.rows_rejected},
        "files": per_file,
        "tokens": {
            "sequences": tally.sequences,
            "real": tally.tokens,
            "padded": tally.padded_tokens,
            "padding_overhead": (tally.padded_tokens / tally.tokens - 1.0) if tally.tokens else 0.0,
            "batches": tally.batches,
            "truncated_pretokenized": tally.truncated_pretokenized,
        },
        "seconds": {
            "startup": startup_s,
            "read": read_s,
            "tokenize": tally.tokenize_seconds,
            "tokenize_wait": tally.tokenize_wait_seconds,
            "infer": tally.infer_seconds,
            "rank": rank_s,
            "write": tally.write_seconds,
            "total": total_s,
        },
        "rows_per_second": tally.rows_scored / processing_s if processing_s > 0 else 0.0,
        "tokens_per_second": tally.tokens / processing_s if processing_s > 0 else 0.0,
        "settings": settings.to_dict(),
        "model": {
            "name": model.name, "path": str(model.path), "mode": model.mode, "pooling": model.pooling,
            "precision": model.precision, "checksum": model.checksum, "source_sha256": model.source_sha256,
        },
        "metrics": metrics,
    }


class _NoProgress:
    def update(self, n: float) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(unit="rows", unit_scale=True, smoothing=0.1, dynamic_ncols=True,
                bar_format="{l_bar}{n:.0f} rows [{elapsed}, {rate_fmt}]")
