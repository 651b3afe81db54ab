"""Masked-language modelling (BERT, Devlin et al. 2019; ModernBERT's 30% rate): the objective an encoder
pretrains on. Each window of the token stream is a micro-batch row; `mask_rate` of its tokens (never
[CLS] or [SEP]) are chosen, and of those 80% become [MASK], 10% a random token and 10% stay, and the
loss is taken at the chosen positions alone. Documents in a window are separate segments: attention
stays within one and positions restart at its [CLS].

Windows and masks come from a generator keyed by (seed, step, micro-batch), as pretraining's windows
do, so resume needs no sampler state and N ranks see what one process with N x accumulation sees."""

from __future__ import annotations

import numpy as np
import torch

from lmkiln.device import autocast
from lmkiln.model.loss import IGNORE, next_token_losses
from lmkiln.model.masking import mlm_batch
from lmkiln.train import dist


def mlm_batch_at(
    tokens: np.ndarray,
    seed: int,
    step: int,
    micro: int,
    batch: int,
    seq_len: int,
    rate: float,
    ids: dict,
    vocab_size: int,
    word_start: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The micro-batch of a step: random windows of seq_len tokens, masked."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch)
    windows = np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts])
    return mlm_batch(windows, rng, rate, ids, vocab_size, word_start)


@torch.no_grad()
def ranked_mean_loss(objective, tensors: tuple, batch_size: int, ctx) -> float:
    """Mean of `objective.losses` over the rows of `tensors` (validation's fixed windows): each rank
    takes every world-th row, in batches, and the sums meet across ranks."""
    rows = tuple(t[ctx.rank :: ctx.world] for t in tensors)
    objective.model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows[0]), batch_size):
        losses = objective.losses(objective.model, tuple(t[i : i + batch_size] for t in rows))
        total, count = total + losses.sum().item(), count + len(losses)
    objective.model.train()
    total, count = dist.all_sum([total, count], ctx)
    return total / max(count, 1)


def val_windows(tokens: np.ndarray, seq_len: int, n: int) -> np.ndarray:
    """Window starts spread evenly over the validation tokens."""
    return np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)


class MaskedLM:
    """Pretraining's objective for an encoder: what `train/loop.py` needs (this rank's micro-batches of a
    step, the step's masked-token count over all ranks, a micro-batch's summed loss) and the validation
    loss on fixed masked windows."""

    def __init__(
        self,
        recipe,
        model,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        accum: int,
        ctx,
        ids: dict,
        vocab_size: int,
        word_start: np.ndarray | None = None,  # whole-word masking: which ids begin a word
    ) -> None:
        self.recipe, self.model, self.train, self.val = recipe, model, train_tokens, val_tokens
        self.accum, self.ctx, self.ids, self.vocab, self.word_start = accum, ctx, ids, vocab_size, word_start
        self._counts: dict[int, int] = {}

    def flops_per_token(self, args) -> float:
        return args.flops_per_token(self.recipe.pretrain.seq_len)

    def _batch(self, step: int, micro: int):
        c = self.recipe.pretrain
        return mlm_batch_at(
            self.train,
            self.recipe.seed,
            step,
            micro,
            c.batch_size,
            c.seq_len,
            c.mask_rate,
            self.ids,
            self.vocab,
            self.word_start,
        )

    def micro_batches(self, step: int) -> list:
        out = []
        for micro in range(self.accum):
            batch = self._batch(step, micro * self.ctx.world + self.ctx.rank)
            out.append(tuple(t.pin_memory() for t in batch) if self.ctx.device.type == "cuda" else batch)
        return out

    def weight(self, step: int) -> float:
        """The masked tokens of the whole step, every rank's micro-batches drawn again (the draw is cheap
        beside the step, and the same on every rank), so the loss is their mean however they split."""
        if step not in self._counts:
            micros = range(self.accum * self.ctx.world)
            self._counts = {step: sum(int((self._batch(step, m)[1] != IGNORE).sum()) for m in micros)}
        return max(self._counts[step], 1)

    def losses(self, run, batch) -> torch.Tensor:
        x, y, seg = (t.to(self.ctx.device, non_blocking=True) for t in batch)
        weight, bias = (None, None) if dist.is_sharded(self.model) else dist.unwrap(self.model).output_layer()
        with autocast(self.ctx.device):
            losses, _ = next_token_losses(run, x, y, weight, seg, bias=bias)
        return losses

    def loss(self, run, batch) -> tuple[torch.Tensor, int]:
        return self.losses(run, batch).sum(), batch[0].numel()

    @torch.no_grad()
    def val_loss(self) -> float:
        """Mean loss at the masked positions of evenly spaced validation windows, masked the same way at
        every evaluation (a generator keyed by the seed), split across ranks."""
        c, ctx = self.recipe.pretrain, self.ctx
        n = min(c.eval_batches * c.batch_size, max(1, (len(self.val) - 1) // c.seq_len))
        n = max(ctx.world, n - n % ctx.world)
        starts = val_windows(self.val, c.seq_len, n)
        rng = np.random.default_rng([self.recipe.seed, 1 << 30])
        windows = np.stack([np.asarray(self.val[s : s + c.seq_len], dtype=np.int64) for s in starts])
        x, y, seg = mlm_batch(windows, rng, c.mask_rate, self.ids, self.vocab, self.word_start)
        return ranked_mean_loss(self, (x, y, seg), c.batch_size, ctx)
