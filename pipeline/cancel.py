"""Cancellation of a run from outside it (no paddle).

The CLI turns SIGINT/SIGTERM into `CancelToken.cancel()`; a library caller or a Ray driver can
call it from any thread. Long loops (the batch loop, the final ranking) call `check()` at their
natural boundaries, which raises `Cancelled` once cancellation was asked for.
"""

from __future__ import annotations

import threading


class Cancelled(Exception):
    """The run was asked to stop; work committed so far is kept."""


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("interrupted")

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)
