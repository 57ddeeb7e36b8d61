"""Streaming reader for generation input (no paddle): files -> validated chunks of prompts.

The same formats, row identity, streaming and accounting as `pipeline.io.reader` (which reads
query-doc pairs): every record ends in a `PromptChunk` or as a `Reject` naming file, line and
reason; a file-level problem (missing, empty, a required column absent, a TSV whose quoting
cannot be told) is an `InputError` raised when the reader is built, before any work. TSV files
are read by `tsv_quoting` ("auto" | "csv" | "none", the `--tsv-quoting` flag, see
`pipeline.io.reader`); `reader.quoting` says per TSV file how it was read and why.

Columns (renamed with the `--col-*` flags, `ColumnMap`):
- `id`: a string or integer, unique over the whole input (the first occurrence wins, later
  ones are rejected naming where it was first seen);
- `prompt` (plain text) or `messages` (chat turns: a JSON list of {"role", "content"} objects;
  in TSV/CSV a JSON string, in JSONL/Parquet also a native list). A file holds one or the other;
  every file of a run holds the same one;
- `reference` (optional): one string, or a list of strings (in TSV/CSV a cell starting with
  `[` is read as a JSON list). An empty reference cell means the row has none; metrics count
  only rows with references.

Rejected (with the reason in rejects.tsv): a missing or empty id, an empty prompt, messages that
are not valid JSON, not a non-empty list, or hold a turn without a non-empty string role and
string content (the content of the last turn must not be blank), a reference that is not a string
or a list of strings, a NUL anywhere, a duplicate id.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.formats import Layout, Record, TsvQuoting, check_tsv_quoting, inspect_file, list_input_files, read_records
from pipeline.io.rows import ColumnMap, FileCount, InputError, PromptChunk, Reject, RowError
from pipeline.io.validate import SeenPairs, _identifier, _show, _text, pair_keys

__all__ = ["PromptReader", "parse_messages", "parse_reference"]


def parse_messages(value: Any, name: str) -> list[dict]:
    """Chat turns from a JSON string or a native list; RowError naming what is wrong."""
    turns = value
    if type(value) is str:
        if not value.strip():
            raise RowError(f"empty text in field '{name}'")
        try:
            turns = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise RowError(f"field '{name}' is not valid JSON: {e}") from None
    elif value is None:
        raise RowError(f"missing field '{name}'")
    if type(turns) is not list or not turns:
        raise RowError(f"field '{name}' must be a non-empty JSON list of {{\"role\", \"content\"}} turns, "
                       f"got {_show(turns)}")
    out = []
    for i, t in enumerate(turns):
        if type(t) is not dict:
            raise RowError(f"field '{name}' turn {i}: not an object ({_show(t)})")
        role, content = t.get("role"), t.get("content")
        if type(role) is not str or not role.strip():
            raise RowError(f"field '{name}' turn {i}: 'role' must be a non-empty string")
        if type(content) is not str:
            raise RowError(f"field '{name}' turn {i}: 'content' must be a string")
        if "\x00" in role or "\x00" in content:
            raise RowError(f"NUL byte in field '{name}' turn {i}")
        out.append({"role": role, "content": content})
    if not out[-1]["content"].strip():
        raise RowError(f"field '{name}': the last turn's content is empty")
    return out


def parse_reference(value: Any, name: str) -> tuple[str, ...]:
    """References of a row: () for a missing or empty cell, else one or more strings."""
    if value is None or (type(value) is float and math.isnan(value)):
        return ()
    refs = value
    if type(value) is str:
        s = value.strip()
        if not s:
            return ()
        if s.startswith("["):
            try:
                refs = json.loads(s)
            except (ValueError, RecursionError) as e:
                raise RowError(f"field '{name}' starts with '[' but is not a JSON list of strings: {e}") from None
        else:
            refs = [value]
    if type(refs) is not list or not all(type(r) is str for r in refs):
        raise RowError(f"field '{name}' must be a string or a list of strings, got {_show(value)}")
    if any("\x00" in r for r in refs):
        raise RowError(f"NUL byte in field '{name}'")
    return tuple(r for r in refs if r.strip())


class PromptReader:
    """Reads the given files in order as chunks of validated prompts (see the module docstring).

    The same interface as `DatasetReader` where the job uses it: `files`, `counts`, `quoting`,
    `has_label` (here: some file has a reference column), `chunks()`."""

    pretokenized = False

    def __init__(self, paths: Sequence[str | Path], columns: ColumnMap = ColumnMap(), chunk_rows: int = 256,
                 tsv_quoting: str = "auto"):
        self.tsv_quoting = check_tsv_quoting(tsv_quoting)
        self.files = list_input_files(paths)
        self.columns = columns
        self.chunk_rows = chunk_rows
        self._layouts = [inspect_file(p, tsv_quoting) for p in self.files]
        self.quoting: dict[str, TsvQuoting] = TsvQuoting.of(self.files, self._layouts)
        self.text_field = self._text_field(self.files[0], self._layouts[0])  # 'prompt' | 'messages'
        for path, layout in zip(self.files, self._layouts):
            self._check_columns(path, layout)
        self.has_label = any(columns.reference in layout.columns for layout in self._layouts)
        self.counts: dict[str, FileCount] = {str(p): FileCount(str(p)) for p in self.files}

    def _text_field(self, path: Path, layout: Layout) -> str:
        c = self.columns
        has_prompt, has_messages = c.prompt in layout.columns, c.messages in layout.columns
        if has_prompt and has_messages:
            raise InputError(f"{path}: {layout.where}: both {c.prompt!r} and {c.messages!r} columns; a file holds "
                             f"one of them (map the other away with --col-prompt/--col-messages)")
        return "messages" if has_messages else "prompt"

    def _check_columns(self, path: Path, layout: Layout) -> None:
        c = self.columns
        text_col = getattr(c, self.text_field)
        found = ", ".join(repr(col) for col in layout.columns)
        missing = [col for col in (c.id, text_col) if col not in layout.columns]
        if missing:
            what = (f"{c.prompt!r} (or {c.messages!r})" if self.text_field == "prompt" and path == self.files[0]
                    else repr(text_col))
            msg = (f"{path}: {layout.where}: generation input needs the columns {c.id!r} and {what}; missing "
                   f"{', '.join(repr(m) for m in missing)}; columns found: {found}. Map other names with --col-id, "
                   f"--col-prompt or --col-messages")
            if path != self.files[0]:
                msg += f" (the first file, {self.files[0]}, holds {text_col!r}; all files must hold the same)"
            raise InputError(msg)
        other = c.messages if self.text_field == "prompt" else c.prompt
        if other in layout.columns:
            raise InputError(f"{path}: {layout.where}: holds {other!r}, but the first file holds {text_col!r}; "
                             f"all files of a run must hold the same one")
        for col in (c.id, text_col, c.reference):
            if layout.columns.count(col) > 1:
                raise InputError(f"{path}: {layout.where}: column {col!r} appears {layout.columns.count(col)} times")

    def chunks(self) -> Iterator[tuple[PromptChunk | None, list[Reject]]]:
        """(chunk, rejects) per batch of chunk_rows records, as `DatasetReader.chunks`."""
        seen = SeenPairs()
        names = [str(p) for p in self.files]
        for name in names:
            self.counts[name] = FileCount(name)
        next_row = 0
        c = self.columns
        text_col = getattr(c, self.text_field)
        for index, (path, layout) in enumerate(zip(self.files, self._layouts)):
            has_ref = c.reference in layout.columns
            wanted = [c.id, text_col] + ([c.reference] if has_ref else [])
            records = read_records(path, layout.fmt, wanted, self.chunk_rows, layout.tsv_quoting)
            validator = _PromptValidator(names, index, next_row, seen, c, self.text_field, has_ref,
                                         self.counts[names[index]])
            while batch := list(islice(records, self.chunk_rows)):
                yield validator.process(batch)
            next_row = validator.next_row


class _PromptValidator:
    def __init__(self, files: list[str], index: int, first_row: int, seen: SeenPairs, columns: ColumnMap,
                 text_field: str, has_ref: bool, count: FileCount):
        self.files, self.index, self.file = files, index, files[index]
        self.next_row, self.seen, self.columns = first_row, seen, columns
        self.text_field, self.has_ref, self.count = text_field, has_ref, count

    def process(self, records: list[Record]) -> tuple[PromptChunk | None, list[Reject]]:
        c, file = self.columns, self.file
        rows, lines, ids, texts, refs, rejects = [], [], [], [], [], []
        messages = self.text_field == "messages"
        row = self.next_row - 1
        for line, record in records:
            row += 1
            if type(record) is str:
                rejects.append(Reject(file, line, row, record))
                continue
            rid = ""
            try:
                rid = _identifier(record[0], c.id)
                text = parse_messages(record[1], c.messages) if messages else _text(record[1], c.prompt)
                ref = parse_reference(record[2], c.reference) if self.has_ref else ()
            except RowError as e:
                rejects.append(Reject(file, line, row, e.reason, rid))
                continue
            rows.append(row)
            lines.append(line)
            ids.append(rid)
            texts.append(text)
            refs.append(ref)
        self.next_row = row + 1
        if ids:
            keep = self._first_occurrences(rows, lines, ids, rejects)
            rows, lines, ids, texts, refs = ([x for x, k in zip(col, keep) if k]
                                             for col in (rows, lines, ids, texts, refs))
        self.count.rows_read += len(records)
        self.count.rows_rejected += len(rejects)
        if not ids:
            return None, rejects
        return PromptChunk(file, np.array(rows, np.int64), np.array(lines, np.int64), ids,
                           None if messages else texts, texts if messages else None, refs), rejects

    def _first_occurrences(self, rows, lines, ids, rejects) -> list[bool]:
        n_files = len(self.files)
        first = self.seen.first_seen(pair_keys(ids, [""] * len(ids)),
                                     np.array(lines, dtype=np.int64) * n_files + self.index)
        for i in np.flatnonzero(first >= 0).tolist():
            seen_line, seen_file = divmod(int(first[i]), n_files)
            rejects.append(Reject(self.file, lines[i], rows[i],
                                  f"duplicate id {ids[i]!r}, first seen at {self.files[seen_file]}:{seen_line}", ids[i]))
        rejects.sort(key=lambda r: r.row)
        return (first < 0).tolist()
