"""Length-sorted batches on a token budget (no paddle).

Sorting a window of sequences by length and cutting batches on a budget of *padded* tokens
keeps padding small (EET's length-aware batching) and bounds the memory of a batch, as
text-embeddings-inference's queue does. The longest sequences go first, so a budget that is too
small for the data fails on the first batch, not hours into a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.tokenizer import Encoded


@dataclass(frozen=True)
class Batch:
    rows: np.ndarray  # indices into the window's sequences, longest first
    seq_len: int  # padded length of the batch

    @property
    def padded_tokens(self) -> int:
        return len(self.rows) * self.seq_len


def plan_batches(lengths: np.ndarray, max_batch_tokens: int, max_batch_size: int,
                 pad_to_multiple: int = 1) -> list[Batch]:
    """Cut length-sorted batches: each holds at most `max_batch_size` rows and at most
    `max_batch_tokens` padded tokens (rows x its longest sequence, rounded up to
    `pad_to_multiple`)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    assert max_batch_size >= 1 and pad_to_multiple >= 1
    if len(lengths) == 0:
        return []
    padded_len = -(-lengths // pad_to_multiple) * pad_to_multiple
    longest = int(padded_len.max())
    assert longest <= max_batch_tokens, (
        f"a sequence of {longest} tokens does not fit max_batch_tokens={max_batch_tokens}"
    )
    order = np.argsort(-lengths, kind="stable")
    batches: list[Batch] = []
    start = 0
    n = len(order)
    while start < n:
        seq_len = int(padded_len[order[start]])  # the first row of a batch is its longest
        size = min(max_batch_size, max_batch_tokens // seq_len, n - start)
        batches.append(Batch(order[start:start + size], seq_len))
        start += size
    return batches


def pad_batch(enc: Encoded, batch: Batch, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded (input_ids, token_type_ids, attention_mask) arrays for one batch."""
    b, s = len(batch.rows), batch.seq_len
    ids = np.full((b, s), pad_id, dtype=np.int64)
    types = np.zeros((b, s), dtype=np.int64)
    mask = np.zeros((b, s), dtype=np.float32)
    starts = enc.ids.offsets[batch.rows]
    lens = enc.ids.offsets[batch.rows + 1] - starts
    # One fancy-index gather instead of a Python loop over rows.
    col = np.arange(s)
    valid = col[None, :] < lens[:, None]
    src = (starts[:, None] + col[None, :])[valid]
    ids[valid] = enc.ids.flat[src]
    types[valid] = enc.types.flat[src]
    mask[valid] = 1.0
    return ids, types, mask
