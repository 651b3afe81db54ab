"""`kiln estimate`: parameters, memory per device and time per step, before any training.

Activation memory is not guessed from a formula: one forward pass of the real model runs on the meta
device (no memory is allocated) while a `saved_tensors_hooks` pack hook adds up every tensor autograd
keeps for the backward pass. On top of that: weights, gradients, optimizer state, and the loss's head
(`head_loss_bytes`: a chunk of logits at a time, or whole logits under FSDP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.config import Recipe
from lmkiln.errors import UserError
from lmkiln.log import console
from lmkiln.model.families import family_of
from lmkiln.model.families.transformer import ModelArgs
from lmkiln.runs import stage_dir
from lmkiln.train.speed import device_peak

# temporaries and allocator slack: glibc keeps freed tensors' memory (its mmap threshold rises as large
# blocks are freed), about 40% over the live tensors in the CPU runs measured. Set so the mean ratio of
# estimate to measured peak over eight runs (four decoder and four encoder shapes) is 0.96 (0.75-1.16).
ALLOCATOR_OVERHEAD = 1.3
EFFICIENCY = {"cpu": 0.6, "cuda": 0.4}  # assumed share of peak FLOP/s, for the time estimate


def saved_bytes(
    model: nn.Module, batch: int, seq_len: int, pairs: int = 1, head: bool = True, targets: int | None = None
) -> int:
    """Bytes autograd saves for backward in one forward pass of a (batch, seq_len) micro-batch of a
    model built on the meta device (`head=False`: up to the final norm, for a loss that runs the head
    itself; `targets`: an encoder-decoder's decoder length). With gradient checkpointing, what it keeps
    is each block's input."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params:
            storages[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = torch.zeros(batch * pairs, seq_len, dtype=torch.long, device="meta")
        inputs = (x,) if targets is None else (x, x[:, :targets])
        if head:
            F.cross_entropy(model(*inputs).float().flatten(0, 1), inputs[-1].flatten())
        else:
            model(*inputs, hidden_only=True)
    kept = sum(storages.values())
    if getattr(model, "gradient_checkpointing", False):
        args = model.args
        kept += args.num_layers * batch * pairs * seq_len * args.hidden_size * 4
    return kept


def saved_activation_bytes(args, batch: int, seq_len: int, head: bool = True, targets: int | None = None) -> int:
    from lmkiln.model.io.hub import build_model

    with torch.device("meta"):
        model = build_model(args)
    return saved_bytes(model, batch, seq_len, head=head, targets=targets)


def head_loss_bytes(args: ModelArgs, tokens: int, chunked: bool) -> int:
    """Memory of the LM head's loss in a training step. Whole logits: the logits held by the loss, then
    two logits-sized gradient buffers. Chunked (model/loss.py): one chunk of logits, the head's
    weight gradient computed in the forward pass and its scaled copy, and the hidden states with their
    gradient and its scaled copy."""
    if not chunked:
        return 3 * tokens * args.vocab_size * 4
    from lmkiln.model.loss import _chunk_rows

    chunk = min(tokens, _chunk_rows(args.vocab_size)) * args.vocab_size * 4
    return chunk + 2 * args.vocab_size * args.hidden_size * 4 + 3 * tokens * args.hidden_size * 4


def finetune_memory(args: ModelArgs, cfg, seq_len: int, pairs: int = 1, vocab_logits: bool = True) -> dict:
    """Memory of a fine-tuning run (fp32 on CPU): weights, gradients and AdamW state of what trains,
    the activations of one micro-batch of `seq_len`-token rows (twice the rows for DPO pairs)."""
    from lmkiln.model.io.hub import build_model
    from lmkiln.train.epochs import make_trainable

    with torch.device("meta"), console.capture():  # the meta copy's LoRA line is not news
        model = build_model(args)
        trainable = make_trainable(model, cfg)
    weights = sum(p.numel() for p in model.parameters()) * 4
    activations = saved_bytes(model, cfg.batch_size, seq_len, pairs)
    logits = 3 * cfg.batch_size * pairs * seq_len * args.vocab_size * 4 if vocab_logits else 0
    parts = {
        "weights": weights,
        "gradients": trainable * 4,
        "optimizer": 2 * trainable * 4,
        "activations": activations,
        "logits": logits,
    }
    return {**parts, "total": int(sum(parts.values()) * ALLOCATOR_OVERHEAD)}


def _vocab_size(recipe: Recipe) -> int:
    header = stage_dir(recipe.run_dir, "tokenizer") / "train.json"
    if header.is_file():
        import json

        return json.loads(header.read_text())["vocab_size"]
    return recipe.tokenizer.vocab_size


def optimizer_bytes(args: ModelArgs, kind: str, param_bytes: int = 4) -> int:
    """AdamW keeps two moments per parameter; Muon one momentum per hidden matrix (AdamW on the rest)."""
    total = args.num_params()
    if kind == "adamw":
        return 2 * total * param_bytes
    hidden = (
        args.num_params()
        - args.vocab_size * args.hidden_size * (1 if args.tie_embeddings else 2)
        - args.hidden_size
        - args.num_layers * 2 * args.hidden_size
    )
    return (hidden + 2 * (total - hidden)) * param_bytes


def estimate(recipe: Recipe, world: int = 1, device: str | None = None) -> dict:
    if world < 1:
        raise UserError(f"--world {world}: expected 1 or more ranks")
    cfg = recipe.pretrain
    from lmkiln.model.io.hub import recipe_model_args

    try:
        args = recipe_model_args(recipe.model, _vocab_size(recipe), {})
    except ValueError as exc:
        raise UserError(f"model: {exc}") from None
    from lmkiln.device import pick_device
    from lmkiln.train.pretrain import _grad_accum

    dev = pick_device(device or cfg.device)
    shard = world if cfg.strategy == "fsdp" else 1
    weights = args.num_params() * 4  # fp32 master weights (bf16 autocast on GPU computes in bf16)
    grads = weights
    optim = optimizer_bytes(args, cfg.optimizer)
    act_scale = 0.5 if dev.type == "cuda" else 1.0  # bf16 activations under autocast
    chunked = not (world > 1 and cfg.strategy == "fsdp")  # as pretrain.next_token_loss decides
    targets, objective = None, family_of(args).objective
    if objective == "span":  # the decoder runs on span corruption's targets
        from lmkiln.train.span_corruption import raw_length

        targets = raw_length(cfg.seq_len, cfg.noise_density, cfg.mean_span)[1]
    activations = saved_activation_bytes(args, cfg.batch_size, cfg.seq_len, head=not chunked, targets=targets)
    activations = int(activations * act_scale)
    # an encoder's loss (masked-LM) runs the head at the masked positions alone; T5's at its targets
    scored = cfg.batch_size * (targets or cfg.seq_len) * (cfg.mask_rate if objective == "mlm" else 1)
    logits = head_loss_bytes(args, int(scored), chunked)
    total = int(((weights + grads + optim) / shard + activations + logits) * ALLOCATOR_OVERHEAD)
    accum = _grad_accum(recipe, world)
    tokens_per_step = cfg.batch_size * cfg.seq_len * accum * world
    per_token = args.flops_per_token(cfg.seq_len, targets) if targets else args.flops_per_token(cfg.seq_len)
    flops = per_token * tokens_per_step / world
    peak, source = device_peak(dev)
    seconds = flops / (peak * EFFICIENCY.get(dev.type, 0.4)) if peak else None
    return {
        "parameters": args.num_params(),
        "flops_per_token": per_token,
        "device": str(dev),
        "world_size": world,
        "strategy": cfg.strategy if world > 1 else "single",
        "memory_bytes": {
            "weights": weights // shard,
            "gradients": grads // shard,
            "optimizer": optim // shard,
            "activations": activations,
            "logits": logits,
            "total": total,
        },
        "tokens_per_step": tokens_per_step,
        "seconds_per_step": seconds,
        "tokens_per_s": tokens_per_step / seconds if seconds else None,
        "run_hours": seconds * cfg.max_steps / 3600 if seconds else None,
        "peak_source": source,
    }


def print_estimate(est: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    gib = 2**30
    table = Table(title="estimate (per device)", show_edge=False, show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    table.add_row("parameters", f"{est['parameters'] / 1e6:,.2f}M")
    table.add_row("FLOPs per token (training)", f"{est['flops_per_token'] / 1e6:,.1f}M")
    for key, value in est["memory_bytes"].items():
        table.add_row(f"memory: {key}", f"{value / gib:,.3f} GiB")
    table.add_row("tokens per step", f"{est['tokens_per_step']:,}")
    if est["seconds_per_step"]:
        table.add_row("time per step", f"{est['seconds_per_step']:,.3f} s ({est['peak_source']})")
        table.add_row("whole run", f"{est['run_hours']:,.2f} h")
    Console().print(table)


def print_memory(model, cfg, seq_len: int, pairs: int = 1, vocab_logits: bool = True) -> None:
    mem = finetune_memory(model.args, cfg, seq_len, pairs, vocab_logits)
    gib = 2**30
    console.print(
        f"memory estimate: {mem['total'] / gib:.2f} GiB (weights {mem['weights'] / gib:.2f}, gradients "
        f"{mem['gradients'] / gib:.2f}, optimizer {mem['optimizer'] / gib:.2f}, activations "
        f"{(mem['activations'] + mem['logits']) / gib:.2f} for {cfg.batch_size * pairs} x {seq_len} tokens)"
    )
