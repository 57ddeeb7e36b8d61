"""What a task is (no paddle): which input it takes, how its rows become engine calls, what its
committed table holds, and which final files and metrics it writes.

The job layer (`pipeline.job`) drives any task the same way:
  reader thread:  `prepare(chunk)` -> an `Item` with the `TokenizeRequest` for the workers;
  main thread:    `process(engine, items, results, ...)` per window -> a `WindowOutput`
                  (an Arrow table of finished rows, the rejects, batch statistics);
  at the end:     `finish(store, ...)` -> the task's final files and its metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from pipeline.cancel import CancelToken
from pipeline.engine.engine import BatchStats, Engine
from pipeline.engine.text import TokenizeRequest, TokenizeResult
from pipeline.errors import ConfigError
from pipeline.io.reader import Chunk, ColumnMap, DatasetReader, Reject
from pipeline.io.rerank import RerankSources
from pipeline.io.store import RunStore
from pipeline.ranking.judgements import Judgements


@dataclass(frozen=True)
class InputSpec:
    """What a task's reader reads: files (or the reranking layout's three files) and how."""

    files: tuple[Path, ...]
    columns: ColumnMap = field(default_factory=ColumnMap)
    chunk_rows: int = 2048
    tsv_quoting: str = "auto"  # pipeline.io.formats.TSV_QUOTING
    rerank: RerankSources | None = None  # queries + corpus + candidates instead of `files`
    index_cache: Path | None = None  # where corpus indexes are kept (rerank)


@dataclass(frozen=True)
class FinishSpec:
    """What a task's final files and metrics depend on beyond the committed windows."""

    run_tag: str
    labelled: bool  # some input row has a label (or reference)
    judgements: Judgements | None = None  # qrels: the metrics use them instead of the labels
    recall_k: int | None = None  # also report recall at this depth
    # the input texts of a few rows, read again (`pipeline.io.row_texts.read_row_texts` on the
    # run's reader): {row: {"file", "line", "query", "doc" | "prompt"}}; None = no texts
    row_texts: Callable[[Collection[int]], dict[int, dict]] | None = None


@dataclass
class Item:
    """One reader chunk on its way through the job: its rejects, and the tokenization request
    the workers run (None when every row of the chunk was rejected)."""

    chunk: Chunk | None
    rejects: list[Reject]
    request: TokenizeRequest | None = None
    extra: object = None  # the task's own per-chunk state (bi: each row's text slots)
    future: Future | None = None  # the request's TokenizeResult, set by the job's reader thread


@dataclass
class WindowOutput:
    table: pa.Table  # the window's finished rows, in input order
    rejects: list[Reject]  # rows the window could not finish, with reasons
    stats: BatchStats
    per_file: dict[str, int] = field(default_factory=dict)  # file -> rows finished
    counters: dict[str, float] = field(default_factory=dict)  # task-specific totals for the report (summed)


INPUT_KINDS = ("text", "pretokenized")  # the row layouts DatasetReader knows: text pairs, token-id pairs


class Task(Protocol):
    name: str
    model_output: str  # what the model must output for this task: 'score' | 'embedding' | 'tokens'
    input_kinds: tuple[str, ...]  # the INPUT_KINDS it takes (the reader's columns for each)
    output_files: tuple[str, ...]  # the final files it publishes in the output folder
    progress_unit: str  # what `on_batch` counts: 'rows' | 'tokens'

    def open_reader(self, spec: InputSpec):
        """The reader of its input (`DatasetReader`, `RerankReader` or `PromptReader`); checks
        every header."""

    def encoder_spec(self, model, settings):
        """The picklable tokenizer recipe its worker processes build (`.build().run(request)`)."""

    def open_engine(self, model, settings, backend, pool):
        """The engine its `process` calls, as a context manager (`pool`: the job's tokenizer
        pool, which a task may also use, e.g. to detokenize)."""

    def prepare(self, chunk: Chunk, rejects: list[Reject], max_seq_len: int) -> Item: ...

    def process(self, engine: Engine, items: list[Item], results: list[TokenizeResult], file_index: dict[str, int],
                cancel: CancelToken | None, on_batch: Callable[[int], None]) -> WindowOutput: ...

    def finish(self, store: RunStore, spec: FinishSpec, cancel: CancelToken | None) -> dict:
        """Write the task's final files into the store's staging folder; returns the report's
        sections it owns: `metrics` (None when there are none) and any others."""


def check_input(task: Task, reader: DatasetReader, tasks: dict[str, Task]) -> None:
    """Refuse input whose kind the task does not take, naming the tasks that do."""
    kind = "pretokenized" if reader.pretokenized else "text"
    if kind not in task.input_kinds:
        others = [t.name for t in tasks.values() if kind in t.input_kinds]
        raise ConfigError(f"the input holds {kind} query-doc pairs, which task {task.name!r} does not take; "
                          f"only --mode {' or '.join(others) or '(none)'} can score them")


def sequence_built(n: int, failed: dict[int, str]) -> np.ndarray:
    """bool per item: True where the tokenizer built a sequence."""
    ok = np.ones(n, dtype=bool)
    ok[list(failed)] = False
    return ok
