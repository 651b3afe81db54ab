"""T5's span corruption: the configured noise density and mean span, every span restored by the
targets, and windows that corrupt to fixed lengths, so batches carry no padding."""

import numpy as np
import pytest

from lmkiln.train.span_corruption import (
    corrupted_lengths,
    noise_mask,
    raw_length,
    span_corruption_batch,
    span_counts,
)

SENTINELS = np.arange(999, 899, -1)  # <extra_id_0> is the highest id, as in T5's vocabulary
EOS = 1


def restore(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    """The window back from its inputs and targets: each sentinel in the inputs replaced by what follows
    the same sentinel in the targets."""
    spans, current = {}, None
    for t in targets[:-1]:
        if t in SENTINELS:
            current = int(t)
            spans[current] = []
        else:
            spans[current].append(int(t))
    out = []
    for t in inputs[:-1]:
        out += spans[int(t)] if t in SENTINELS else [int(t)]
    return out


@pytest.mark.parametrize("density,mean_span", [(0.15, 3.0), (0.3, 8.0), (0.5, 1.0)])
def test_noise_density_and_mean_span_are_as_configured(density, mean_span):
    rng = np.random.default_rng(0)
    length = 568
    noise, spans = span_counts(length, density, mean_span)
    assert noise == round(length * density) and spans == round(noise / mean_span)
    for _ in range(20):
        mask = noise_mask(length, density, mean_span, rng)
        starts = mask & ~np.concatenate([[False], mask[:-1]])
        assert mask.sum() == noise and starts.sum() == spans and not mask[0]  # kept tokens first
    assert noise / spans == pytest.approx(mean_span, rel=0.05)


def test_every_span_is_restored_by_the_targets_and_batches_need_no_padding():
    rng = np.random.default_rng(1)
    inputs_length = 512
    length, targets_length = raw_length(inputs_length, 0.15, 3.0)
    assert corrupted_lengths(length, 0.15, 3.0) == (inputs_length, targets_length)
    assert (length, targets_length) == (568, 114)  # nanoT5's and T5's figures for 512 inputs
    windows = rng.integers(2, 800, size=(8, length))
    inputs, targets = span_corruption_batch(windows, rng, 0.15, 3.0, SENTINELS, EOS)
    assert inputs.shape == (8, inputs_length) and targets.shape == (8, targets_length)
    for w, i, t in zip(windows, inputs, targets):
        assert restore(i, t) == w.tolist() and i[-1] == t[-1] == EOS
        sentinels_in = [x for x in i if x in SENTINELS]
        assert sentinels_in == list(SENTINELS[: len(sentinels_in)]) == [x for x in t if x in SENTINELS]
