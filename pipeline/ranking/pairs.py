"""PNR pair counts: correctly, wrongly and tie-ordered document pairs of every query.

Nothing here lists pairs: a query may have 100,000 candidates. Tied pairs come from run
lengths, correct pairs from an inversion count along the score order (a cumulative count per
label value when there are few distinct labels, otherwise a merge sort over all rows).
"""

from __future__ import annotations

import numpy as np

from pipeline.ranking.order import _Ranked, _sort_tie_runs

# Up to this many distinct label values, PNR counts correct pairs with one cumulative sum per
# label value (O(n) each); beyond it the O(n log^2 n) merge count is cheaper. About 20 merge
# levels for a million rows each cost roughly what two or three cumulative passes cost.
_MAX_LABELS_FOR_CUMSUM = 32


def _equal_run_pairs(*sorted_keys: np.ndarray) -> int:
    """Sum of C(c, 2) over runs of adjacent positions that are equal in every key."""
    n = len(sorted_keys[0])
    if n < 2:
        return 0
    new_run = np.zeros(n, dtype=bool)
    new_run[0] = True
    for key in sorted_keys:
        new_run[1:] |= key[1:] != key[:-1]
    counts = np.diff(np.append(np.flatnonzero(new_run), n))
    return int((counts * (counts - 1) // 2).sum())


def _count_ascending_pairs(keys: np.ndarray) -> int:
    """Number of index pairs i < j with keys[i] < keys[j] (strictly), in O(n log^2 n).

    Bottom-up merge sort over the whole array: at level L the array is sorted inside blocks of
    2**L, and every element of a right block counts the smaller elements of its left partner
    with one global np.searchsorted (the block number in the high bits keeps blocks apart).
    Each pair i < j is counted once, at the level where their two blocks merge. The merge
    itself is a stable sort, which numpy (timsort) does in linear time on two sorted runs.
    """
    n = len(keys)
    if n < 2:
        return 0
    vals = keys.astype(np.int64) - int(keys.min())
    value_bits = max(int(vals.max()).bit_length(), 1)
    if value_bits + n.bit_length() > 62:
        raise OverflowError("too many rows or too wide keys for the int64 merge count")
    mask = (1 << value_bits) - 1
    pos = np.arange(n, dtype=np.int64)
    total = 0
    level = 0
    while (1 << level) < n:
        block = pos >> (level + 1)
        composite = (block << value_bits) | vals
        is_right = ((pos >> level) & 1).astype(bool)
        left = composite[~is_right]  # left blocks in block order: globally sorted
        smaller = np.searchsorted(left, composite[is_right], side="left")
        # the left block of block b starts at index b * 2**level of `left`
        total += int(smaller.sum()) - int((block[is_right] << level).sum())
        composite.sort(kind="stable")  # blocks occupy disjoint key ranges: this merges them
        vals = composite & mask
        level += 1
    return total


def _count_lower_label_before(group_seq: np.ndarray, label_seq: np.ndarray, n_labels: int) -> int:
    """Pairs of positions i < j in the same (contiguous) group with label_seq[i] < label_seq[j].

    Same result as _count_ascending_pairs restricted to groups, with one O(n) cumulative count
    per label value: much faster when there are only a few label values (graded 0..4).
    """
    n = len(group_seq)
    group_start = np.concatenate(([True], group_seq[1:] != group_seq[:-1]))
    start_pos = np.maximum.accumulate(np.where(group_start, np.arange(n), 0))
    total = 0
    for value in range(n_labels - 1):  # nothing ranks above the top label
        is_value = label_seq == value
        before = np.cumsum(is_value) - is_value  # rows with this label before each position
        within_group = before - before[start_pos]
        total += int(within_group[label_seq > value].sum())
    return total


def _pair_counts(ranked: _Ranked, label_code: np.ndarray, n_labels: int) -> tuple[int, int, int]:
    """(correct, wrong, tied) counts over pairs of same-query docs with different labels.

    Walk the rows by (query, score ascending) with equal scores ordered by label DEScending.
    Then a same-query pair at positions i < j with label_i < label_j always has
    score_i < score_j (an equal score would have put the higher label first): it is exactly a
    correct pair. So correct = ascending label pairs within queries; tied pairs come from run
    lengths (same score minus same score and label); wrong is what remains.
    """
    group = ranked.group
    n = len(group)
    if n < 2:
        return 0, 0, 0
    # reversed rank order: queries descending, score ascending
    seq = ranked.order[::-1].copy()
    _sort_tie_runs(seq, ranked.key, lambda rows: -label_code[rows])
    key_seq, label_seq, group_seq = ranked.key[seq], label_code[seq], group[seq]
    tied = _equal_run_pairs(key_seq) - _equal_run_pairs(key_seq, label_seq)

    sizes = np.bincount(group, minlength=ranked.n_groups)
    _, same_label = np.unique(group * n_labels + label_code, return_counts=True)
    all_pairs = int((sizes * (sizes - 1) // 2).sum() - (same_label * (same_label - 1) // 2).sum())

    if n_labels <= _MAX_LABELS_FOR_CUMSUM:
        correct = _count_lower_label_before(group_seq, label_seq, n_labels)
    else:
        # Queries come in DEScending code order, so with keys ordered by (query, label) a pair
        # across queries is never ascending: only same-query pairs are counted.
        _, dense = np.unique(group_seq * n_labels + label_seq, return_inverse=True)
        correct = _count_ascending_pairs(dense.reshape(-1))
    return correct, all_pairs - tied - correct, tied
