"""BERT's masking rule (Devlin et al. 2019): the inputs and labels of masked-language modelling, which
pretraining trains an encoder on and `kiln eval` scores it with. `rate` of a window's tokens (never
[CLS], [SEP] or padding) are chosen; of those 80% become [MASK], 10% a random token and 10% stay, and
the labels stand at the chosen positions alone."""

from __future__ import annotations

import numpy as np
import torch

from lmkiln.model.loss import IGNORE


def mask_tokens(
    window: np.ndarray,
    rng: np.random.Generator,
    rate: float,
    mask_id: int,
    vocab_size: int,
    special: np.ndarray,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, labels): labels hold the original token where one was chosen, IGNORE elsewhere. With
    `word_start` (per vocabulary id: does the token begin a word), whole words are chosen: every sub-token
    of a word shares the draw of its first."""
    maskable = ~np.isin(window, special)
    draw = rng.random(window.shape)
    if word_start is not None:
        starts = word_start[window] | ~maskable
        starts[..., 0] = True
        pos = np.broadcast_to(np.arange(window.shape[-1]), window.shape)
        first = np.maximum.accumulate(np.where(starts, pos, 0), axis=-1)
        draw = np.take_along_axis(draw, first, axis=-1)
    chosen = (draw < rate) & maskable
    labels = np.where(chosen, window, IGNORE)
    roll = rng.random(window.shape)
    random_ids = rng.integers(0, vocab_size, size=window.shape)
    out = np.where(chosen & (roll < 0.8), mask_id, window)
    out = np.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, out)
    return out, labels


def segments_of(window: np.ndarray, cls_id: int) -> np.ndarray:
    """A segment id per token: a new segment at each [CLS] (a document's start)."""
    return np.cumsum(window == cls_id, axis=-1)


def mlm_batch(
    windows: np.ndarray,
    rng: np.random.Generator,
    rate: float,
    ids: dict,
    vocab_size: int,
    word_start: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, labels, segment ids) of a batch of windows."""
    special = np.array([ids["cls"], ids["sep"], ids["pad"]])
    x, y = mask_tokens(windows, rng, rate, ids["mask"], vocab_size, special, word_start)
    seg = segments_of(windows, ids["cls"])
    return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64)), torch.from_numpy(seg)
