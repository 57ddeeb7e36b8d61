"""Per-row logit arithmetic of decoding (no paddle): log-softmax normalisers, the top tokens
without sorting the vocabulary, top-k / top-p filtering in Hugging Face's order and rules, and
sampling by inverse CDF from a generator seeded per (seed, row key, sample index), so that a
row's sample never depends on the batch it lands in. Used by `engine/decoding.py`."""

from __future__ import annotations

import hashlib
from typing import Optional, Union

import numpy as np

RowKey = Union[int, str]


def as_float(logits) -> np.ndarray:
    x = np.asarray(logits)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


def log_normalizers(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the max m and log Z = log sum exp(x - m) (float64), so that a token's
    log-probability is (x - m) - log Z. One exp pass over [R, V] in the logits' own precision,
    summed in float64; row by row, so a row's values do not depend on its batch."""
    x = as_float(logits)
    m = x.max(axis=-1, keepdims=True)
    z = np.exp(x - m).sum(axis=-1, dtype=np.float64)
    return m[..., 0].astype(np.float64), np.log(z)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, float64 [R, V]: the values the decoders use, for every token."""
    x = as_float(logits)
    m, log_z = log_normalizers(x)
    return x.astype(np.float64) - m[..., None] - log_z[..., None]


def token_logprobs(x: np.ndarray, m: np.ndarray, log_z: np.ndarray, rows: np.ndarray, toks: np.ndarray) -> np.ndarray:
    return x[rows, toks].astype(np.float64) - m[rows] - log_z[rows]


def _kth_largest(x: np.ndarray, n: int) -> np.ndarray:
    """Each row's n-th largest value [R] (1 <= n <= V)."""
    if n <= 32:
        return x[np.arange(len(x)), top_tokens(x, n)[:, -1]]
    return np.partition(x, x.shape[-1] - n, axis=-1)[:, x.shape[-1] - n]


def top_tokens(x: np.ndarray, n: int) -> np.ndarray:
    """The n largest entries of each row [R, n], largest first, ties by the lower id.

    n argmax passes over a working copy when n is small (much faster than a partition of a
    large vocabulary), a partition otherwise."""
    r, v = x.shape
    if n >= v:
        return np.lexsort((np.tile(np.arange(v), (r, 1)), -x), axis=-1)
    if n > 32:
        kth = _kth_largest(x, n)[:, None]
        chosen = x >= kth
        if (chosen.sum(axis=-1) != n).any():  # ties with the n-th value: the lowest ids first
            tie = x == kth
            room = n - (x > kth).sum(axis=-1, keepdims=True)
            chosen = (x > kth) | (tie & (np.cumsum(tie, axis=-1) <= room))
        idx = np.nonzero(chosen)[1].reshape(r, n)
        order = np.lexsort((idx, -np.take_along_axis(x, idx, axis=-1)), axis=-1)
        return np.take_along_axis(idx, order, axis=-1)
    work = np.array(x, copy=True)
    rows = np.arange(r)
    out = np.empty((r, n), dtype=np.int64)
    for j in range(n):
        out[:, j] = work.argmax(axis=-1)
        work[rows, out[:, j]] = -np.inf
    return out


def sampling_keep(y: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> Optional[np.ndarray]:
    """HF's top-k then top-p on temperature-scaled logits y [R, V]: a bool mask of the tokens
    kept, or None when nothing is filtered.

    top-k keeps the tokens whose logit is at least the k-th largest (ties with it are kept, as
    HF keeps them); top-p, on the distribution top-k left, keeps the most probable tokens up to
    and including the first at which their cumulative probability reaches top_p (at least one;
    the same set as HF's ascending-sort rule, ties ordered by token id). No full sort of the
    vocabulary: the nucleus is searched among the 256 most probable tokens, then 4x as many,
    until their mass reaches top_p."""
    r, v = y.shape
    keep = None
    if 0 < top_k < v:
        kth = _kth_largest(y, top_k)
        keep = y >= kth[:, None]
    if top_p >= 1.0:
        return keep
    e = None if keep is not None else np.exp(y - y.max(axis=-1, keepdims=True))
    nucleus = np.zeros((r, v), dtype=bool)
    for i in range(r):
        if keep is not None:
            cand = np.flatnonzero(keep[i])
            w = np.exp((y[i, cand] - y[i, cand].max()).astype(np.float64))
            total, m = w.sum(), len(cand)
        else:
            total, m = e[i].sum(dtype=np.float64), min(v, 256)
        while True:
            if keep is None:
                cand = np.argpartition(-y[i], m - 1)[:m] if m < v else np.arange(v)
                w = e[i, cand].astype(np.float64)
            order = np.lexsort((cand, -y[i, cand]))  # most probable first, ties by id
            p = w[order] / total
            before = np.concatenate([[0.0], np.cumsum(p)[:-1]])  # mass of the more probable tokens
            inside = before < top_p
            if keep is not None or m == v or before[-1] + p[-1] >= top_p:
                break
            m = min(v, 4 * m)
        inside[0] = True
        nucleus[i, cand[order[inside]]] = True
    return nucleus if keep is None else nucleus & keep


def filter_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """logits / temperature with the tokens top-k and top-p remove at -inf (float64 [R, V])."""
    y = as_float(logits) / temperature
    keep = sampling_keep(y, top_k, top_p)
    y = y.astype(np.float64)
    return y if keep is None else np.where(keep, y, -np.inf)


def sample_tokens(y: np.ndarray, keep: Optional[np.ndarray], uniforms: np.ndarray) -> np.ndarray:
    """One draw per row from softmax(y) over its kept tokens (all if keep is None), by inverse
    CDF in token-id order with that row's uniform in [0, 1)."""
    out = np.empty(len(y), dtype=np.int64)
    for i in range(len(y)):
        cand = np.arange(y.shape[1]) if keep is None else np.flatnonzero(keep[i])
        c = np.cumsum(np.exp((y[i, cand] - y[i, cand].max()).astype(np.float64)))
        out[i] = cand[min(int(np.searchsorted(c, uniforms[i] * c[-1], side="right")), len(cand) - 1)]
    return out


def row_generator(seed: int, row_key: RowKey, sample: int = 0) -> np.random.Generator:
    """The random stream of one sample row: a function of (seed, row key, sample index) only."""
    if isinstance(row_key, (int, np.integer)):
        row_key = int(row_key)
    elif not isinstance(row_key, str):
        raise TypeError(f"row keys must be int or str, got {type(row_key).__name__}")
    digest = hashlib.blake2b(repr((int(seed), row_key, int(sample))).encode("utf-8"), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))
