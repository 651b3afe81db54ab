"""T5's span corruption (Raffel et al. 2020, section 3.1.4): `noise_density` of a window's tokens, in
spans of `mean_span` tokens on average, are cut out; the input keeps the rest with one sentinel
(`<extra_id_0>`, `<extra_id_1>`, ...) where each span was, and the target is each sentinel followed by
the span it stands for. Both end with EOS.

The number of noise tokens and of spans depends only on the window's length, so every window of
`raw_length(inputs_length)` tokens corrupts to exactly `inputs_length` inputs and the same number of
targets: a batch is packed with no padding, as T5 and nanoT5 lay it out. Span boundaries are a uniformly
random split of the noise tokens, and of the kept ones, into that many non-empty runs; the window starts
with kept tokens."""

from __future__ import annotations

import numpy as np


def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of `length` tokens: at least one of each, and at least
    one kept token."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(int(round(noise / mean_span)), 1)
    return noise, spans


def corrupted_lengths(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(inputs, targets) lengths of a corrupted window, EOS included: the kept tokens and a sentinel per
    span; a sentinel per span and the noise tokens."""
    noise, spans = span_counts(length, noise_density, mean_span)
    return length - noise + spans + 1, noise + spans + 1


def raw_length(inputs_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(window length, targets length): the longest window whose corruption has at most `inputs_length`
    inputs (exactly that many, when one exists), and its targets' length."""
    length = inputs_length
    while corrupted_lengths(length + 1, noise_density, mean_span)[0] <= inputs_length:
        length += 1
    return length, corrupted_lengths(length, noise_density, mean_span)[1]


def _segments(items: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """`items` split into `segments` non-empty runs at uniformly random places: the runs' lengths."""
    cuts = np.sort(rng.choice(items - 1, segments - 1, replace=False) + 1) if segments > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [items]]))


def noise_mask(length: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask over the window, True on noise: kept and noise runs alternate, kept first."""
    noise, spans = span_counts(length, noise_density, mean_span)
    kept_runs, noise_runs = _segments(length - noise, spans, rng), _segments(noise, spans, rng)
    runs = np.stack([kept_runs, noise_runs], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), runs)


def corrupt(window: np.ndarray, mask: np.ndarray, sentinels: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one window: each noise span becomes its sentinel in the inputs, and the
    targets are each sentinel followed by its span; both end with EOS."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # the first token of each noise span
    span_sentinels = sentinels[: int(starts.sum())]
    inputs = window.copy()
    inputs[starts] = span_sentinels
    inputs = inputs[~mask | starts]
    targets = np.insert(window[mask], np.flatnonzero(starts[mask]), span_sentinels)
    return np.append(inputs, eos), np.append(targets, eos)


def span_corruption_batch(
    windows: np.ndarray, rng: np.random.Generator, noise_density: float, mean_span: float, sentinels, eos: int
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (B, I), targets (B, T)) of a batch of equal-length windows, no padding in either."""
    sentinels = np.asarray(sentinels)
    pairs = [corrupt(w, noise_mask(len(w), noise_density, mean_span, rng), sentinels, eos) for w in windows]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
