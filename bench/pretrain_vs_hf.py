"""Pretraining throughput: lmkiln's decoder and loop against transformers' LlamaForCausalLM with a plain
PyTorch loop, same architecture, weights, batch, sequence length and optimizer, in one process.

Steps alternate between the two sides, so load on the machine falls on both alike. Prints a table and
a last line of key=value figures. Writes nothing.

    python bench/pretrain_vs_hf.py                  # the 16.9M-parameter reference shape, fp32 on CPU
    python bench/pretrain_vs_hf.py --compile        # lmkiln with torch.compile (the `pretrain.compile` option)
    python bench/pretrain_vs_hf.py --device cuda --preset small --seq 1024 --batch 16   # bf16 autocast on GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from interleaved import optimizer_step  # bench/, beside this script

from lmkiln.device import autocast
from lmkiln.model.families.transformer import PRESETS, ModelArgs, Transformer
from lmkiln.model.io.hub import save_model
from lmkiln.train.optim import make_optimizer
from lmkiln.train.pretrain import next_token_loss
from lmkiln.train.speed import device_peak, mfu

REFERENCE = dict(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=6, intermediate_size=1024)


def build(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    dims = PRESETS[args.preset] if args.preset else REFERENCE
    margs = ModelArgs(vocab_size=args.vocab, max_seq_len=args.seq, tie_embeddings=False, **dims)
    torch.manual_seed(0)
    ours = Transformer(margs)
    ours.init_weights(torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
    device = torch.device(args.device)
    return margs, ours.to(device).train(), hf.to(device).train(), device


def make_steps(args, ours, hf, device):
    """One training step for each side; each returns its loss."""
    opt_ours = make_optimizer(ours, "adamw", 1e-3, 0.1)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    run_ours = torch.compile(ours) if args.compile else ours
    gen = torch.Generator().manual_seed(1)

    def batch():
        x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        return x[:, :-1].to(device), x[:, 1:].to(device)

    def step_ours():
        x, y = batch()
        with autocast(device):
            loss = next_token_loss(run_ours, ours, x, y) / y.numel()  # what `kiln pretrain` computes
        return optimizer_step(ours, opt_ours, loss)

    def step_hf():
        x, y = batch()
        with autocast(device):
            out = hf(input_ids=x)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
        return optimizer_step(hf, opt_hf, loss)

    return step_ours, step_hf


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step().item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default=None, help="model size (default: the 16.9M reference)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side (and compilation)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile lmkiln's model")
    args = p.parse_args()

    margs, ours, hf, device = build(args)
    step_ours, step_hf = make_steps(args, ours, hf, device)
    for _ in range(args.warmup):
        step_ours(), step_hf()
    t_ours, t_hf = [], []
    for _ in range(args.steps):
        t_ours.append(timed(step_ours, device))
        t_hf.append(timed(step_hf, device))
    tokens = args.batch * args.seq
    tps_ours, tps_hf = tokens / statistics.median(t_ours), tokens / statistics.median(t_hf)
    peak, source = device_peak(device)
    util = mfu(tps_ours, margs.flops_per_token(args.seq), peak)
    util_hf = mfu(tps_hf, margs.flops_per_token(args.seq), peak)
    print(
        f"model: {margs.num_params() / 1e6:.1f}M parameters, batch {args.batch} × {args.seq}, {device}, "
        f"threads {torch.get_num_threads()}, peak {peak / 1e9:,.0f} GFLOP/s ({source})"
        if peak
        else ""
    )
    print(f"{'':10} {'tokens/s':>10} {'s/step':>8} {'MFU':>6}")
    print(f"{'lmkiln':10} {tps_ours:10,.0f} {statistics.median(t_ours):8.3f} {util or 0:6.1%}")
    print(f"{'hf':10} {tps_hf:10,.0f} {statistics.median(t_hf):8.3f} {util_hf or 0:6.1%}")
    print(
        f"tokens_per_s lmkiln={tps_ours:.0f} hf={tps_hf:.0f} ratio={tps_ours / tps_hf:.3f} "
        f"mfu={util or 0:.3f} compile={int(args.compile)}"
    )


if __name__ == "__main__":
    main()
