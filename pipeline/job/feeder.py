"""The reader thread (no paddle): reads chunks, has the task prepare each one, submits its
tokenization to the pool, and queues the items in input order (bounded read-ahead, so memory
does not grow with the input)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool

from pipeline.cancel import CancelToken
from pipeline.io.reader import DatasetReader
from pipeline.job.workers import TokenizerPool
from pipeline.tasks.base import Item, Task

_END = object()


class RunError(Exception):
    """The run cannot go on (a tokenizer worker died, ...); the message says why."""


WORKER_DIED = ("a tokenizer worker process died (killed or out of memory); committed work is kept: "
               "rerun with --resume")


class ChunkFeeder(threading.Thread):
    def __init__(self, reader: DatasetReader, pool: TokenizerPool, task: Task, max_seq_len: int, depth: int,
                 skip: int = 0):
        super().__init__(daemon=True, name="chunk-feeder")
        self.reader, self.pool, self.task, self.max_seq_len = reader, pool, task, max_seq_len
        self.skip = skip  # chunks an earlier session committed: read (for counts) but not queued
        self.items: queue.Queue = queue.Queue(maxsize=depth)
        self.read_seconds = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            chunks, index = self.reader.chunks(), 0
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

    def _submit(self, chunk, rejects) -> Item:
        if chunk is None or len(chunk) == 0:
            return Item(None, rejects)
        item = self.task.prepare(chunk, rejects, self.max_seq_len)
        item.future = self.pool.submit(item.request)
        return item

    def windows(self, window_rows: int, cancel: CancelToken) -> Iterator[tuple[list[Item], int]]:
        """Items grouped into windows of at least `window_rows` rows (the last may be smaller),
        each with the number of reader chunks consumed so far (the skipped ones included)."""
        window, rows, chunks = [], 0, self.skip
        while True:
            try:
                item = self.items.get(timeout=0.2)
            except queue.Empty:
                cancel.check()
                continue
            if item is _END:
                break
            if isinstance(item, BrokenProcessPool):
                raise RunError(WORKER_DIED) from item
            if isinstance(item, BaseException):
                raise item
            window.append(item)
            chunks += 1
            rows += len(item.chunk) if item.chunk is not None else 0
            if rows >= window_rows:
                yield window, chunks
                window, rows = [], 0
        if window:
            yield window, chunks
