"""The in-memory engine: a runtime model directory in, texts in, arrays out (as
`SentenceTransformer.encode` sits above its backend).

The engine owns everything between text and the backend: the model's `TextEncoder` (tokenizer
and pruned-vocabulary id map), length-sorted token-budget batches (`plan_batches`), the pool of
streams that run batches at once, and restoring input order. It knows nothing about files,
windows or resumption; the job layer and the tasks call it.

- `run_encoded(enc)`: already-tokenized sequences -> backend outputs in `enc`'s order, plus the
  `BatchStats` of that call (nothing run-wide is mutated);
- `encode(texts)`: bi models -> one L2-normalised embedding per text (each distinct text once);
- `score_pairs(queries, docs)`: one relevance score per pair (cross: the model's score; bi: the
  cosine of the two embeddings).

paddle is imported only when the default backend is created (`pipeline.engine.predictor`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeline.cancel import CancelToken
from pipeline.engine.batching import Batch, pad_batch, plan_batches
from pipeline.engine.modeldir import ModelInfo
from pipeline.engine.text import TextEncoder, TextEncoderSpec
from pipeline.engine.tokenizer import Encoded


class Backend(Protocol):
    """The model behind one small interface: a padded batch in, scores [B] or embeddings [B, H]
    out. `run` may be called from `concurrency` threads at once."""

    concurrency: int

    def run(self, input_ids: np.ndarray, token_type_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class BackendUnavailable(RuntimeError):
    """The asked-for backend cannot run on this install or machine; the message says why."""


@dataclass(frozen=True)
class EngineSettings:
    max_seq_len: int
    max_batch_tokens: int = 4096  # bounds activation memory: Paddle keeps each op's output per batch
    max_batch_size: int = 64
    pad_multiple: int = 1  # batch lengths rounded up to a multiple (8 on the GPU for tensor cores)
    threads: int = 1  # predictor math threads in all
    streams: int = 1  # predictors running batches at once, threads split among them
    device: str = "cpu"
    precision: str = "fp32"
    tensorrt: bool = False
    trt_varlen: bool = False

    def __post_init__(self) -> None:
        assert self.max_seq_len >= 3, f"max_seq_len must be >= 3, got {self.max_seq_len}"
        assert 1 <= self.streams <= self.threads, f"streams must be in 1..threads, got {self.streams}, {self.threads}"
        assert self.max_batch_size >= 1 and self.pad_multiple >= 1

    @property
    def threads_per_stream(self) -> int:
        return max(1, self.threads // self.streams)


@dataclass
class BatchStats:
    """What one engine call did: sequences, real and padded tokens, batches, seconds."""

    sequences: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    seconds: float = 0.0


def create_backend(model: ModelInfo, s: EngineSettings) -> Backend:
    from pipeline.engine.predictor import GpuUnavailable, PaddlePredictor, PredictorSettings

    try:
        return PaddlePredictor(model, PredictorSettings(
            threads=s.threads_per_stream, streams=s.streams, device=s.device, precision=s.precision,
            tensorrt=s.tensorrt, trt_varlen=s.trt_varlen, trt_max_seq_len=s.max_seq_len,
            trt_max_batch=s.max_batch_size))
    except GpuUnavailable as e:
        raise BackendUnavailable(str(e)) from e


def cosine(table: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product of unit embeddings `table[a]` and `table[b]` (float64)."""
    return np.einsum("ij,ij->i", table[a], table[b])


def distinct(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """The distinct texts in order of first appearance, and each input's index among them."""
    slots: dict[str, int] = {}
    idx = np.fromiter((slots.setdefault(t, len(slots)) for t in texts), np.int64, len(texts))
    return list(slots), idx


class Engine:
    def __init__(self, model: ModelInfo, settings: EngineSettings, backend: Backend | None = None):
        assert settings.max_seq_len <= model.max_position_embeddings, (
            f"max_seq_len {settings.max_seq_len} exceeds the model's {model.max_position_embeddings} positions")
        self.model, self.settings = model, settings
        self.text = TextEncoder(TextEncoderSpec.of(model))
        self.backend = backend if backend is not None else create_backend(model, settings)
        self._streams = getattr(self.backend, "concurrency", 1)  # test doubles may leave it out
        self._pool = ThreadPoolExecutor(self._streams, thread_name_prefix="stream") if self._streams > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def plan(self, enc: Encoded) -> list[Batch]:
        s = self.settings
        return plan_batches(enc.lengths, s.max_batch_tokens, s.max_batch_size, s.pad_multiple)

    def _outputs(self, enc: Encoded, batches: list[Batch], cancel: CancelToken | None) -> Iterator[np.ndarray]:
        """Backend outputs of `batches` in order. With several streams, up to two batches per
        stream are in flight, so a stream never waits for the caller."""
        check = cancel.check if cancel is not None else (lambda: None)
        pad_id = self.text.pad_id

        def run_one(batch: Batch) -> np.ndarray:
            return self.backend.run(*pad_batch(enc, batch, pad_id))

        if self._pool is None:
            for batch in batches:
                check()
                yield run_one(batch)
            return
        ahead, pending = 2 * self._streams, deque()
        try:
            for i in range(len(batches)):
                while len(pending) < ahead and i + len(pending) < len(batches):
                    check()
                    pending.append(self._pool.submit(run_one, batches[i + len(pending)]))
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
            wait(pending)  # no stream may still write into a batch the caller has given up on

    def run_encoded(self, enc: Encoded, cancel: CancelToken | None = None,
                    on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, BatchStats]:
        """Every sequence of `enc` through the backend in length-sorted batches; outputs in
        `enc`'s order, and what it took."""
        batches = self.plan(enc)
        stats, out, t0 = BatchStats(sequences=len(enc), tokens=int(enc.lengths.sum())), None, time.perf_counter()
        for batch, res in zip(batches, self._outputs(enc, batches, cancel)):
            assert res.shape[0] == len(batch.rows), f"backend returned {res.shape[0]} rows for {len(batch.rows)}"
            if out is None:
                out = np.empty((len(enc),) + res.shape[1:], dtype=res.dtype)
            out[batch.rows] = res
            stats.padded_tokens += batch.padded_tokens
            stats.batches += 1
            if on_batch is not None:
                on_batch(len(batch.rows))
        stats.seconds = time.perf_counter() - t0
        return (out if out is not None else np.empty((0,), dtype=np.float32)), stats

    def encode(self, texts: list[str], cancel: CancelToken | None = None) -> np.ndarray:
        """bi models: the unit embedding of each text [n, H], in input order."""
        assert self.model.output == "embedding", f"{self.model.path} outputs {self.model.output}s, not embeddings"
        uniq, idx = distinct(list(texts))
        table, _ = self.run_encoded(self.text.texts(uniq, self.settings.max_seq_len), cancel)
        return table[idx] if len(idx) else np.empty((0, self.model.hidden_size), np.float32)

    def score_pairs(self, queries: list[str], docs: list[str], cancel: CancelToken | None = None) -> np.ndarray:
        """One float64 score per (query, doc), as `run` scores them."""
        assert len(queries) == len(docs), f"{len(queries)} queries but {len(docs)} docs"
        if self.model.output == "score":
            out, _ = self.run_encoded(self.text.pairs(list(queries), list(docs), self.settings.max_seq_len), cancel)
            return out.astype(np.float64)
        uniq, idx = distinct(list(queries) + list(docs))
        table, _ = self.run_encoded(self.text.texts(uniq, self.settings.max_seq_len), cancel)
        return cosine(table.astype(np.float64), idx[:len(queries)], idx[len(queries):])
