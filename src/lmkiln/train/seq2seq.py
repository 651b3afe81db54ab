"""Span corruption (T5): the objective an encoder-decoder pretrains on. Each micro-batch row is a window of
`raw_length(seq_len)` tokens of the stream, corrupted (train/span_corruption.py) into exactly `seq_len`
inputs and a fixed number of targets, so no row is padded; the decoder reads the targets shifted right
behind the start token, and the loss is every target token's cross-entropy through the chunked head.

Windows and spans come from a generator keyed by (seed, step, micro-batch), as the decoder's windows do,
so resume needs no sampler state and N ranks see what one process with N x accumulation sees."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lmkiln.data.examples import encode_pairs, sample
from lmkiln.device import autocast
from lmkiln.errors import UserError
from lmkiln.log import console
from lmkiln.model.families.t5 import pair_batch, shift_right, target_losses
from lmkiln.model.loss import linear_cross_entropy
from lmkiln.train import dist
from lmkiln.train.epochs import load_trainable
from lmkiln.train.finetune_run import FinetuneRun, Training, save_best
from lmkiln.train.mlm import ranked_mean_loss, val_windows
from lmkiln.train.span_corruption import raw_length, span_corruption_batch


class SpanCorruption:
    """What `train/loop.py` needs of an encoder-decoder's pretraining: this rank's micro-batches of a step,
    the step's target-token count, a micro-batch's summed loss, and the validation loss."""

    def __init__(self, recipe, model, train_tokens: np.ndarray, val_tokens: np.ndarray, accum: int, ctx, ids: dict):
        self.recipe, self.model, self.train, self.val, self.accum, self.ctx = (
            recipe,
            model,
            train_tokens,
            val_tokens,
            accum,
            ctx,
        )
        c = recipe.pretrain
        self.raw_len, self.targets_len = raw_length(c.seq_len, c.noise_density, c.mean_span)
        self.sentinels, self.eos, self.pad = np.asarray(ids["sentinels"]), ids["eos"], ids["pad"]

    def flops_per_token(self, args) -> float:
        """Per input token, with the decoder running on the targets' length."""
        return args.flops_per_token(self.recipe.pretrain.seq_len, self.targets_len)

    def _corrupted(self, windows: np.ndarray, rng: np.random.Generator):
        c = self.recipe.pretrain
        inputs, targets = span_corruption_batch(windows, rng, c.noise_density, c.mean_span, self.sentinels, self.eos)
        x, y = torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(targets.astype(np.int64))
        return x, shift_right(y, self.pad, self.pad), y

    def _batch(self, step: int, micro: int):
        rng = np.random.default_rng([self.recipe.seed, step, micro])
        starts = rng.integers(0, len(self.train) - self.raw_len, size=self.recipe.pretrain.batch_size)
        windows = np.stack([np.asarray(self.train[s : s + self.raw_len], dtype=np.int64) for s in starts])
        return self._corrupted(windows, rng)

    def micro_batches(self, step: int) -> list:
        return [self._batch(step, m * self.ctx.world + self.ctx.rank) for m in range(self.accum)]

    def weight(self, step: int) -> float:
        """Every target token of every rank's micro-batches: a fixed count, since none is padding."""
        return self.accum * self.ctx.world * self.recipe.pretrain.batch_size * self.targets_len

    def losses(self, run, batch) -> torch.Tensor:
        x, d, y = (t.to(self.ctx.device, non_blocking=True) for t in batch)
        with autocast(self.ctx.device):
            if dist.is_sharded(self.model):  # the head's weight is whole only inside the forward
                return F.cross_entropy(run(x, d).float().flatten(0, 1), y.flatten(), reduction="none")
            h = run(x, d, hidden_only=True)
            return linear_cross_entropy(h.flatten(0, 1), dist.unwrap(self.model).lm_head.weight, y.flatten())

    def loss(self, run, batch) -> tuple[torch.Tensor, int]:
        return self.losses(run, batch).sum(), batch[0].numel()

    @torch.no_grad()
    def val_loss(self) -> float:
        """Mean target loss of evenly spaced validation windows, corrupted the same way at every
        evaluation (a generator keyed by the seed), split across ranks."""
        c, ctx = self.recipe.pretrain, self.ctx
        n = min(c.eval_batches * c.batch_size, max(1, (len(self.val) - 1) // self.raw_len))
        n = max(ctx.world, n - n % ctx.world)
        starts = val_windows(self.val, self.raw_len, n)
        windows = np.stack([np.asarray(self.val[s : s + self.raw_len], dtype=np.int64) for s in starts])
        x, d, y = self._corrupted(windows, np.random.default_rng([self.recipe.seed, 1 << 30]))
        return ranked_mean_loss(self, (x, d, y), c.batch_size, ctx)


def prepare_seq2seq(run: FinetuneRun) -> Training:
    """Text-to-text fine-tuning of an encoder-decoder: the encoder reads each row's input, the decoder is
    trained on its output; full or LoRA, with fine-tuning's validation, early stopping and checkpoints."""
    cfg, device, splits = run.cfg, run.device, run.splits
    if any("chosen" in ex or "label" in ex for ex in splits["train"][:1]):  # before the model loads
        raise UserError("finetune: an encoder-decoder base trains on instruction or chat rows (text to text)")
    model, trainable = load_trainable(run.base_dir, cfg, device)
    args = dist.unwrap(model).args
    pad, start = args.pad_token_id, args.decoder_start_token_id
    train = encode_pairs(run.tok, splits["train"], cfg.max_seq_len, args.eos_token_id)
    val = encode_pairs(run.tok, sample(splits["val"], cfg.max_val_examples), cfg.max_seq_len, args.eos_token_id)
    if not val:
        raise UserError(f"finetune.data: the validation split of {cfg.data} is empty; add rows or raise val_fraction")
    console.print(f"text to text: train {len(train):,} pairs, val {len(val):,}, test {len(splits['test']):,}")

    def head() -> torch.Tensor:
        return dist.unwrap(model).lm_head.weight

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(val), cfg.batch_size):
            idx = list(range(i, min(i + cfg.batch_size, len(val))))
            losses = target_losses(model, head(), pair_batch(val, idx, pad, start, device))
            total, count = total + losses.sum().item(), count + len(losses)
        model.train()
        return {"loss": total / max(count, 1)}

    def micro_loss(net, idx: list[int]) -> tuple[torch.Tensor, int]:
        batch = pair_batch(train, idx, pad, start, device)
        return target_losses(net, head(), batch).sum(), batch[0].numel() + batch[2].numel()

    return Training(
        model,
        list(range(len(train))),
        [len(s) + len(t) for s, t in train],
        micro_loss,
        lambda idx: sum(len(train[i][1]) for i in idx),
        evaluate,
        save_best(run, model),
        trainable,
        title="text-to-text fine-tuning",
        facts={"task": "generate", "examples": len(train)},
    )
