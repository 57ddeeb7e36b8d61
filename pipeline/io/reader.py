"""Streaming dataset reader (no paddle): input files -> validated chunks of query-doc rows.

Every record ends up either in a `Chunk` (accepted) or as a `Reject` naming its file, line and
reason, so a few bad rows in a large dataset cost those rows and not the run. Problems that make
a whole file unusable (missing, empty, required column absent, not the format its name says)
raise `InputError`; the headers of *all* files are checked when the reader is built, so such a
problem stops the run before any work rather than hours into it.

Formats, chosen by suffix: `.tsv` (tab-separated), `.csv` (standard quoting, a record may span
lines), `.jsonl`/`.ndjson` (one object per line) and `.parquet`; the three text formats may also
be gzipped (`.tsv.gz` ...). Files are streamed, so memory holds one chunk plus the (qid, doc_id)
index used to find duplicates.

TSV quoting (`tsv_quoting`, the `--tsv-quoting` flag): `none` reads quotes as text (raw dumps
such as MS MARCO's collection.tsv), `csv` reads quoted fields as pandas `to_csv(sep="\t")` and
`csv.writer(delimiter="\t")` write them (doubled quotes inside; tabs and line breaks inside, so a
record may span lines), `auto` (default) decides per file from a scan of the whole file when the
reader is built, by the rule in `pipeline.io.formats`, and raises InputError when a file holds
both kinds of evidence. `reader.quoting` says per TSV file how it is read and why.

Rows are either text pairs (`qid, query, doc_id, doc`) or pre-tokenized pairs
(`qid, doc_id, input_ids, token_type_ids`), both with an optional graded `label`. A JSONL
file's first object plays the role of a header: its keys say which columns the file has.
Blank lines are skipped in every text format; they count as lines, not as rows.

A row's identity is `(file, line)`: the path as given and the physical line where its record
starts (Parquet: its row number). It is the same in every run and shard that reads the file. The
global `row` index also counts the rows of earlier files; it orders the outputs, nothing more.

The work is split over `pipeline.io.formats` (files, headers, raw records),
`pipeline.io.validate` (field checks, duplicates) and `pipeline.io.rows` (the types); this
module is the import path for all of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path

from pipeline.io.formats import (TSV_QUOTING, Layout, Record, TsvQuoting, check_tsv_quoting, detect_format,
                                 inspect_file, list_input_files, read_records)
from pipeline.io.rows import Chunk, ColumnMap, FileCount, InputError, Reject
from pipeline.io.validate import SeenPairs, Validator, pair_key, pair_keys

__all__ = ["TSV_QUOTING", "Chunk", "ColumnMap", "DatasetReader", "FileCount", "InputError", "Reject", "SeenPairs",
           "TsvQuoting", "detect_format", "list_input_files", "pair_key", "pair_keys"]


class DatasetReader:
    """Reads the given files in order as chunks of validated rows (see the module docstring)."""

    def __init__(self, paths: Sequence[str | Path], columns: ColumnMap = ColumnMap(), chunk_rows: int = 4096,
                 pretokenized: bool | None = None, tsv_quoting: str = "auto"):
        """pretokenized None = detect from the first file's columns (text columns present -> text;
        input_ids present -> pre-tokenized). All files must agree.

        tsv_quoting: "auto" | "csv" | "none", how TSV files are read (module docstring); ValueError
        for another value. Every file's header is checked here (and, with "auto", every TSV file
        scanned), so a bad file fails the run before any work."""
        self.tsv_quoting = check_tsv_quoting(tsv_quoting)
        self.files = list_input_files(paths)
        self.columns = columns
        self.chunk_rows = chunk_rows
        self._layouts = [inspect_file(p, tsv_quoting) for p in self.files]
        # per TSV file (path as given): how it is read ("csv" | "none") and why
        self.quoting: dict[str, TsvQuoting] = TsvQuoting.of(self.files, self._layouts)
        first = self._layouts[0].columns
        if pretokenized is None:
            has_text = columns.query in first and columns.doc in first
            pretokenized = not has_text and columns.input_ids in first
        self.pretokenized: bool = pretokenized
        for path, layout in zip(self.files, self._layouts):
            self._check_columns(path, layout)
        self.has_label: bool = any(columns.label in layout.columns for layout in self._layouts)
        self.counts: dict[str, FileCount] = {str(p): FileCount(str(p)) for p in self.files}

    def _required(self) -> list[tuple[str, str]]:
        """(field, column) pairs every file must have, in record order."""
        c = self.columns
        if self.pretokenized:
            fields = ("qid", "doc_id", "input_ids", "token_type_ids")
        else:
            fields = ("qid", "doc_id", "query", "doc")
        return [(f, getattr(c, f)) for f in fields]

    def _check_columns(self, path: Path, layout: Layout) -> None:
        c = self.columns
        missing = [(f, col) for f, col in self._required() if col not in layout.columns]
        if missing:
            kind = "pre-tokenized" if self.pretokenized else "text"
            names = ", ".join(repr(col) for _, col in missing)
            flags = ", ".join(f"--col-{f.replace('_', '-')} NAME" for f, _ in missing)
            found = ", ".join(repr(col) for col in layout.columns)
            msg = (f"{path}: {layout.where}: missing required column{'s' if len(missing) > 1 else ''} {names} "
                   f"for {kind} input; columns found: {found}. If the data is under other names, map them "
                   f"with {flags}")
            if path != self.files[0]:
                msg += f" (the first file, {self.files[0]}, holds {kind} input; all files must be of one kind)"
            elif not self.pretokenized:
                msg += (f" (pre-tokenized input has {c.qid!r}, {c.doc_id!r}, {c.input_ids!r}, "
                        f"{c.token_type_ids!r} instead)")
            raise InputError(msg)
        for _, col in self._required() + [("label", c.label)]:
            if layout.columns.count(col) > 1:
                raise InputError(f"{path}: {layout.where}: column {col!r} appears {layout.columns.count(col)} times")

    def _records(self, path: Path, labelled: bool, layout: Layout) -> Iterator[Record]:
        wanted = [col for _, col in self._required()] + ([self.columns.label] if labelled else [])
        return read_records(path, layout.fmt, wanted, self.chunk_rows, layout.tsv_quoting)

    def chunks(self) -> Iterator[tuple[Chunk | None, list[Reject]]]:
        """Yields (chunk, rejects) per batch of chunk_rows records (fewer at the end of a file);
        chunk holds the batch's accepted rows, None when all of them were rejected. A batch never
        spans two files. Each call reads the dataset from the start (row indices, duplicates and
        counts start afresh)."""
        seen = SeenPairs()
        names = [str(p) for p in self.files]
        for name in names:
            self.counts[name] = FileCount(name)
        next_row = 0
        for index, (path, layout) in enumerate(zip(self.files, self._layouts)):
            labelled = self.columns.label in layout.columns
            validator = Validator(names, index, next_row, seen, self.columns, self.pretokenized, labelled,
                                  self.has_label, self.counts[names[index]])
            records = self._records(path, labelled, layout)
            while batch := list(islice(records, self.chunk_rows)):
                yield validator.process(batch)
            next_row = validator.next_row
