"""What the dataset reader hands out (no paddle): accepted rows, rejected rows, per-file counts.

Row identity: a row is identified by `(file, line)`, the file's path as the caller gave it and the
1-based physical line where its record starts (Parquet: the 1-based row number). Both depend on
that file alone, so the pair names the same row in every run and in every process or shard that
reads the file, and no two rows of a run share it (a file reached twice is read once). The global
`row` index is not an identity: it counts the records of all earlier files too, and serves only
to keep the run's outputs in input order.

These types live here, apart from `pipeline.io.reader`, so that the formats and validation
modules can use them without importing the reader; import them from `pipeline.io.reader`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class InputError(Exception):
    """File-level problem; message names file, line (when known) and field. Caller exits non-zero."""


class RowError(Exception):
    """A record that cannot be used; `reason` goes into its Reject."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ColumnMap:
    """The column (or JSON key) that holds each field, as set by the `--col-*` flags."""

    qid: str = "qid"
    query: str = "query"
    doc_id: str = "doc_id"
    doc: str = "doc"
    label: str = "label"
    input_ids: str = "input_ids"
    token_type_ids: str = "token_type_ids"
    # generation input (pipeline.io.prompts)
    id: str = "id"
    prompt: str = "prompt"
    messages: str = "messages"
    reference: str = "reference"


@dataclass
class Reject:
    """A record left out of the run, with enough to find and fix it in the input.

    `(file, line)` identifies the record (see the module docstring); `row` only orders it."""

    file: str  # path as given by the caller
    line: int  # 1-based physical line where the record starts (Parquet: 1-based row number)
    row: int  # global 0-based input row index, counting accepted and rejected records of all files
    reason: str
    qid: str = ""
    doc_id: str = ""


@dataclass
class Chunk:
    """Accepted rows of one file, in input order.

    Row i is identified by `(file, line[i])` (see the module docstring); `row[i]` only orders it."""

    file: str
    row: np.ndarray  # int64, global 0-based input row index
    line: np.ndarray  # int64, as in Reject
    qid: list[str]
    doc_id: list[str]
    query: list[str] | None  # None for pre-tokenized input
    doc: list[str] | None
    label: np.ndarray | None  # float64, NaN for files without a label column; None if no file has one
    input_ids: list[list[int]] | None  # only for pre-tokenized input
    token_type_ids: list[list[int]] | None

    def __len__(self) -> int:
        return len(self.qid)


@dataclass
class PromptChunk:
    """Accepted generation rows of one file, in input order (identity as for `Chunk`).

    Each row has a plain `prompt` or chat `messages` (a list of {"role", "content"} turns),
    whichever the file holds, and its references (empty where the row has none)."""

    file: str
    row: np.ndarray  # int64
    line: np.ndarray  # int64
    id: list[str]
    prompt: list[str] | None  # files with a prompt column
    messages: list[list[dict]] | None  # files with a messages column
    reference: list[tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.id)


@dataclass
class FileCount:
    """Per-file tally for the report; filled as the file is read."""

    file: str
    rows_read: int = 0
    rows_rejected: int = 0  # rows accepted = rows_read - rows_rejected
