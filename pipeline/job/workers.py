"""Tokenizer worker processes (no paddle): `TokenizeRequest`s in, `TokenizeResult`s out.

Each worker process builds its own `TextEncoder` from the model's picklable `TextEncoderSpec`
once, at start-up; `--workers 0` runs the same code inline in the reader thread. A worker exits
by itself when the run's process is gone (killed), so none lingers holding memory.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor

from pipeline.engine.text import TextEncoder, TextEncoderSpec, TokenizeRequest, TokenizeResult

_ENCODER: TextEncoder | None = None  # this worker process's encoder (worker processes only)


def _init_worker_process(parent: int, spec: TextEncoderSpec) -> None:
    """A worker process: build the encoder, and exit when the run's process (`parent`) is gone.
    A worker blocked on the task queue never notices on its own when its parent is SIGKILLed (the
    queue's pipe has other holders), and would linger holding memory. The parent's pid comes from
    the parent itself: a worker still booting when the parent died is already orphaned here."""
    global _ENCODER
    if os.getppid() != parent:
        os._exit(1)
    _ENCODER = spec.build()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _tokenize(req: TokenizeRequest) -> TokenizeResult:
    assert _ENCODER is not None, "worker not initialised"
    return _ENCODER.run(req)


def _ready() -> bool:
    return _ENCODER is not None


class TokenizerPool:
    """`workers` processes (spawned, so nothing of the parent's state leaks in), or inline."""

    def __init__(self, spec: TextEncoderSpec, workers: int):
        self.workers = workers
        if workers > 0:
            self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker_process, initargs=(os.getpid(), spec))
            # Start every worker now (the pool spawns them on demand otherwise), so that they all
            # boot while the predictor loads.
            for _ in range(workers):
                self._executor.submit(_ready)
            self._inline = None
        else:
            self._executor, self._inline = None, spec.build()

    def submit(self, req: TokenizeRequest) -> Future:
        if self._executor is not None:
            return self._executor.submit(_tokenize, req)
        f: Future = Future()
        try:
            f.set_result(self._inline.run(req))
        except BaseException as e:  # noqa: BLE001 - delivered to the consumer like a worker's error
            f.set_exception(e)
        return f

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
