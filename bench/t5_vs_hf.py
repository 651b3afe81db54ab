"""Span-corruption pretraining throughput: lmkiln's T5 and loss against transformers'
T5ForConditionalGeneration in a plain PyTorch loop: same shape, weights, batches (T5's span corruption,
15% noise in spans of 3, inputs and targets of fixed length), optimizer, in one process.

Steps alternate between the two sides, so load on the machine falls on both alike. transformers runs
as a user would write the loop (`model(input_ids, labels=targets).loss`); lmkiln runs what `kiln pretrain`
runs with `model.arch=t5`: the decoder's states, then the head a chunk at a time inside the loss.
Tokens are input tokens, as T5 and nanoT5 count them. Prints a table and a last line of key=value figures.

The vocabulary is T5's own 32,128 ids (every T5, T5 v1.1 and Flan-T5 checkpoint has it): the head and its
loss are a real share of a T5 step, and where lmkiln's chunked loss differs most from the full logits.

    python bench/t5_vs_hf.py                   # 4+4 layers x 384, vocab 32,128, 16 x 256 inputs, fp32 on CPU
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from interleaved import optimizer_step, print_comparison, time_interleaved  # bench/, beside this script

from lmkiln.model.families.t5 import T5, T5Args, shift_right
from lmkiln.model.io.hub import save_model
from lmkiln.model.loss import linear_cross_entropy
from lmkiln.train.optim import make_optimizer
from lmkiln.train.span_corruption import raw_length, span_corruption_batch


def build(args: argparse.Namespace):
    from transformers import AutoModelForSeq2SeqLM

    targs = T5Args(
        vocab_size=args.vocab, d_model=384, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=6
    )
    ours = T5(targs)
    ours.init_weights(torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        hf = AutoModelForSeq2SeqLM.from_pretrained(tmp, dtype=torch.float32)
    return targs, ours.train(), hf.train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32128, help="T5's vocabulary (default 32,128)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256, help="input tokens per row")
    p.add_argument("--steps", type=int, default=8, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    args = p.parse_args()

    targs, ours, hf = build(args)
    opt_ours = make_optimizer(ours, "adamw", 1e-3, 0.1, (0.9, 0.95))
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    rng = np.random.default_rng(1)
    raw, targets_len = raw_length(args.seq, 0.15, 3.0)
    sentinels = np.arange(args.vocab - 1, args.vocab - 101, -1)

    def batch():
        windows = rng.integers(3, args.vocab - 100, size=(args.batch, raw))
        x, y = span_corruption_batch(windows, rng, 0.15, 3.0, sentinels, 1)
        return torch.from_numpy(x), torch.from_numpy(y)

    def step_ours():
        x, y = batch()
        h = ours(x, shift_right(y, 0, 0), hidden_only=True)  # what pretrain's SpanCorruption runs
        loss = linear_cross_entropy(h.flatten(0, 1), ours.lm_head.weight, y.flatten()).mean()
        return optimizer_step(ours, opt_ours, loss)

    def step_hf():
        x, y = batch()
        loss = hf(input_ids=x, labels=y).loss
        return optimizer_step(hf, opt_hf, loss)

    s_ours, s_hf = time_interleaved(step_ours, step_hf, args.warmup, args.steps)
    header = (
        f"model: T5 {targs.num_params() / 1e6:.1f}M parameters, batch {args.batch} × {args.seq} inputs "
        f"({raw} raw tokens, {targets_len} targets)"
    )
    print_comparison(header, args.batch * args.seq, s_ours, s_hf, targs.flops_per_token(args.seq, targets_len))


if __name__ == "__main__":
    main()
