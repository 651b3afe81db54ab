"""Sequence packing for fine-tuning: several short examples share one row of up to max_len tokens, so
no compute goes to padding. Each token carries its example's segment id; the model restarts positions
at each example and masks attention to within it, so packed examples never see each other."""

from __future__ import annotations

import bisect

Encoded = tuple[list[int], list[int]]
Row = tuple[list[int], list[int], list[int]]  # ids, labels, segment ids


def best_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    """Indices grouped into bins of at most max_len tokens: longest first, each into the bin it fills
    most tightly (best-fit decreasing, within 11/9 of the optimal bin count)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            room, b = max_len - lengths[i], len(bins) - 1
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def pack(encoded: list[Encoded], max_len: int) -> list[Row]:
    """Rows of whole examples; an example's last label is IGNORE, so no row trains across a boundary."""
    rows = []
    for group in best_fit([len(ids) for ids, _ in encoded], max_len):
        ids, labels, segments = [], [], []
        for seg, i in enumerate(sorted(group)):
            ids += encoded[i][0]
            labels += encoded[i][1]
            segments += [seg] * len(encoded[i][0])
        rows.append((ids, labels, segments))
    return rows


def fill(rows: list, max_len: int) -> float:
    """Share of the row capacity holding real tokens."""
    return sum(len(r[0]) for r in rows) / (len(rows) * max_len) if rows else 0.0
