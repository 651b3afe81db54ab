"""Masked-language pretraining throughput: lmkiln's ModernBERT encoder and loss against transformers'
ModernBertForMaskedLM in a plain PyTorch loop: same shape, weights, batch (30% masked, 80/10/10),
sequence length and optimizer, in one process.

Steps alternate between the two sides, so load on the machine falls on both alike. transformers runs
as a user would write the loop (`model(input_ids, labels=labels).loss`, its default dense prediction);
lmkiln runs what `kiln pretrain` runs with `model.arch=modernbert`: the decoder only at masked
positions, a chunk at a time, inside the loss. Prints a table and a last line of key=value figures.

    python bench/mlm_vs_hf.py                  # 6 x 384, vocab 8,192, 16 x 256 tokens, fp32 on CPU
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from interleaved import optimizer_step, print_comparison, time_interleaved  # bench/, beside this script

from lmkiln.model.families.encoder import Encoder, EncoderArgs
from lmkiln.model.io.hub import save_model
from lmkiln.model.loss import IGNORE, next_token_losses
from lmkiln.model.masking import mlm_batch
from lmkiln.train.optim import make_optimizer

IDS = {"cls": 1, "sep": 2, "pad": 0, "mask": 3}


def build(args: argparse.Namespace):
    from transformers import AutoModelForMaskedLM

    margs = EncoderArgs(
        vocab_size=args.vocab,
        hidden_size=384,
        intermediate_size=576,
        num_layers=6,
        num_heads=6,
        max_seq_len=args.seq,
        local_attention=128,
        pad_token_id=0,
        cls_token_id=1,
        sep_token_id=2,
    )
    ours = Encoder(margs)
    ours.init_weights(torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        hf = AutoModelForMaskedLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
    return margs, ours.train(), hf.train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    args = p.parse_args()

    margs, ours, hf = build(args)
    opt_ours = make_optimizer(ours, "adamw", 1e-3, 0.1, (0.9, 0.95))
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    rng = np.random.default_rng(1)

    def batch():
        windows = rng.integers(4, args.vocab, size=(args.batch, args.seq))
        windows[:, 0] = IDS["cls"]
        x, y, _ = mlm_batch(windows, rng, 0.3, IDS, args.vocab)
        return x, y

    def step_ours():
        x, y = batch()
        losses, _ = next_token_losses(ours, x, y, ours.decoder.weight, bias=ours.decoder.bias)  # what pretrain runs
        loss = losses.sum() / (y != IGNORE).sum()
        return optimizer_step(ours, opt_ours, loss)

    def step_hf():
        x, y = batch()
        loss = hf(input_ids=x, labels=y).loss
        return optimizer_step(hf, opt_hf, loss)

    s_ours, s_hf = time_interleaved(step_ours, step_hf, args.warmup, args.steps)
    header = (
        f"model: ModernBERT {margs.num_params() / 1e6:.1f}M parameters, batch {args.batch} × {args.seq}, 30% masked"
    )
    print_comparison(header, args.batch * args.seq, s_ours, s_hf, margs.flops_per_token(args.seq))


if __name__ == "__main__":
    main()
