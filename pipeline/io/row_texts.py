"""The input texts of a few rows, read again after the run (no paddle), for report.html.

A run keeps ids, scores and tokens, not texts: storing every text beside its score would double
the store for tens of millions of rows. When the report wants a handful of texts (the worst
queries' top documents, the generation sample's prompts), `read_row_texts` reads the inputs
again through the run's own reader, so a row is found exactly as the run read it (same
validation, same rerank join, same row numbers), and stops after the last wanted row. No
tokenizing: one reading pass at most, usually far less than the model's time.

Texts are cut to `MAX_TEXT_CHARS` characters (the page cuts further); the reader's per-file
counts are left as the run's pass left them.
"""

from __future__ import annotations

from collections.abc import Collection

from pipeline.io.rows import Chunk, PromptChunk

__all__ = ["MAX_TEXT_CHARS", "cut_text", "read_row_texts"]

MAX_TEXT_CHARS = 400


def cut_text(text: str | None) -> str | None:
    """`text` cut at MAX_TEXT_CHARS characters (marked ` ...`); None stays None."""
    if text is None:
        return None
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + " ..."


def _messages_text(messages: list[dict]) -> str:
    """A chat prompt as `role: content` lines, as the page shows it."""
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in messages)


def read_row_texts(reader, rows: Collection[int]) -> dict[int, dict]:
    """{row: {"file", "line", and "query", "doc" (scoring rows; None for pre-tokenized input) or
    "prompt" (generation rows)}} for the wanted global row indices that the reader accepts
    again. `reader` is the run's reader (`DatasetReader`, `RerankReader` or `PromptReader`)."""
    wanted = set(int(r) for r in rows)
    if not wanted:
        return {}
    last, found = max(wanted), {}
    saved = dict(reader.counts)  # chunks() starts the counts afresh: keep the run's
    chunks = reader.chunks()
    try:
        for chunk, _ in chunks:
            if chunk is None:
                continue
            for i in (i for i, r in enumerate(chunk.row.tolist()) if r in wanted):
                rec = {"file": chunk.file, "line": int(chunk.line[i])}
                if isinstance(chunk, PromptChunk):
                    rec["prompt"] = cut_text(chunk.prompt[i] if chunk.prompt is not None
                                         else _messages_text(chunk.messages[i]))
                else:
                    assert isinstance(chunk, Chunk), f"unknown chunk type {type(chunk).__name__}"
                    rec["query"] = cut_text(chunk.query[i]) if chunk.query is not None else None
                    rec["doc"] = cut_text(chunk.doc[i]) if chunk.doc is not None else None
                found[int(chunk.row[i])] = rec
            if len(found) == len(wanted) or int(chunk.row[-1]) >= last:
                break
    finally:
        chunks.close()  # a rerank reader closes its corpus index
        reader.counts.clear()
        reader.counts.update(saved)
    return found
