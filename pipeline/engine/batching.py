"""Length-sorted batches on a token budget (no paddle).

Sorting a window of sequences by length and cutting batches on a budget of *padded* tokens
keeps padding small (EET's length-aware batching) and bounds the memory of a batch, as
text-embeddings-inference's queue does. The longest sequences go first, so a budget that is too
small for the data fails on the first batch, not hours into a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.engine.tokenizer import Encoded

# The fixed cost of one predictor call, in padded tokens of work: per-call overhead (copies,
# kernel dispatch) plus, on the CPU, oneDNN preparing a batch length it has not seen before.
BATCH_COST_TOKENS = 256


@dataclass(frozen=True)
class Batch:
    rows: np.ndarray  # indices into the window's sequences, longest first
    seq_len: int  # padded length of the batch

    @property
    def padded_tokens(self) -> int:
        return len(self.rows) * self.seq_len


def plan_batches(lengths: np.ndarray, max_batch_tokens: int, max_batch_size: int,
                 pad_to_multiple: int = 1, batch_cost_tokens: int = BATCH_COST_TOKENS) -> list[Batch]:
    """Cut length-sorted sequences into batches of at most `max_batch_size` rows and at most
    `max_batch_tokens` padded tokens (rows x the batch's longest length, rounded up to
    `pad_to_multiple`).

    The cut points minimise padded tokens + `batch_cost_tokens` per batch (an exact dynamic
    programme over the sorted lengths): greedy filling to the budget pads a lot where lengths
    fall steeply, many tiny batches pay the fixed cost of a predictor call; this balances both.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    assert max_batch_size >= 1 and pad_to_multiple >= 1 and batch_cost_tokens >= 0
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(-lengths, kind="stable")
    padded = (-(-lengths[order] // pad_to_multiple) * pad_to_multiple).astype(np.float64)
    assert padded[0] <= max_batch_tokens, (
        f"a sequence of {int(padded[0])} tokens does not fit max_batch_tokens={max_batch_tokens}"
    )
    # best[i]: least cost of batching sorted rows i..n-1; a batch starting at i has length padded[i].
    best = np.zeros(n + 1)
    size = np.zeros(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        k_max = int(min(max_batch_size, max_batch_tokens // padded[i], n - i))
        k = np.arange(1, k_max + 1)
        cost = k * padded[i] + batch_cost_tokens + best[i + 1:i + k_max + 1]
        j = int(np.argmin(cost))
        best[i], size[i] = cost[j], j + 1
    batches, i = [], 0
    while i < n:
        batches.append(Batch(order[i:i + size[i]], int(padded[i])))
        i += int(size[i])
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


def position_ids(mask: np.ndarray) -> np.ndarray:
    """Position ids of a padded batch for a model that takes them as an input (the `--target gpu`
    export): 0..n-1 on a sequence's n real tokens, 0 on its padding.

    That is the form Paddle's variable-length TensorRT path reads: its transformer_input_convert
    plugin takes a sequence's length to be the number of positions i whose id equals i, and builds
    the cumulative sequence offsets of the padding-free kernels from that. Padding ids of 0
    (i > 0) do not count; the real tokens are a prefix of each row (`pad_batch`)."""
    assert mask.ndim == 2, f"mask must be [batch, seq], got {mask.shape}"
    return (np.arange(mask.shape[1], dtype=np.int64)[None, :] * (mask > 0)).astype(np.int64)
