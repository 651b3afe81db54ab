"""`kiln pretrain`: next-token prediction on packed token shards, resumable from the last checkpoint."""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmkiln.config import Recipe
from lmkiln.device import autocast, pick_device, seed_everything
from lmkiln.errors import UserError
from lmkiln.io import sha256_json
from lmkiln.log import console, progress
from lmkiln.model.transformer import Transformer, build_args
from lmkiln.pipeline import stage_dir, upstream
from lmkiln.tokenizer.encode import open_shard
from lmkiln.tokenizer.train import load_tokenizer, special_ids
from lmkiln.train.checkpoint import latest_checkpoint, load_trainer_state, prune, save_checkpoint
from lmkiln.train.metrics import MetricsLog, plot_curves, read_metrics
from lmkiln.train.optim import adamw, cosine_lr, set_lr


def config_of(recipe: Recipe) -> dict:
    return {"model": recipe.model.model_dump(mode="json"), "pretrain": recipe.pretrain.model_dump(mode="json"),
            "seed": recipe.seed}


def inputs_of(recipe: Recipe, run_dir: Path) -> dict:
    return {"tokenizer": upstream(run_dir, "tokenizer")}


def batch_at(tokens: np.ndarray, seed: int, step: int, micro: int, batch: int, seq_len: int):
    """The micro-batch of a given step: random windows drawn from a generator keyed by (seed, step,
    micro), so the data position is the step number and resume needs no sampler state."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
    chunk = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def val_loss(model: Transformer, tokens: np.ndarray, seq_len: int, batches: int, batch: int, device) -> float:
    """Mean loss over fixed evenly spaced windows of the validation tokens (the same at every eval)."""
    model.eval()
    n_windows = min(batches * batch, max(1, (len(tokens) - 1) // seq_len))
    starts = np.linspace(0, len(tokens) - seq_len - 1, n_windows).astype(np.int64)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        chunk = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts[i:i + batch]]).astype(np.int64))
        x, y = chunk[:, :-1].to(device), chunk[:, 1:].to(device)
        with autocast(device):
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's preemption, `kill`) saves a checkpoint like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def build(recipe: Recipe, run_dir: Path, out: Path, on_step=None) -> dict:
    cfg = recipe.pretrain
    tok_dir = stage_dir(run_dir, "tokenizer")
    train_tokens, header = open_shard(tok_dir / "train")
    val_tokens, _ = open_shard(tok_dir / "val")
    if len(train_tokens) <= cfg.seq_len + 1:
        raise UserError(f"pretrain.seq_len={cfg.seq_len} is longer than the training data ({len(train_tokens)} tokens)")
    if cfg.seq_len > recipe.model.max_seq_len:
        raise UserError(f"pretrain.seq_len={cfg.seq_len} exceeds model.max_seq_len={recipe.model.max_seq_len}")
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    device = pick_device(cfg.device)
    seed_everything(recipe.seed)
    try:
        args = build_args(recipe.model, header["vocab_size"], ids)
        model = Transformer(args)
    except ValueError as exc:
        raise UserError(f"model: {exc}") from None
    model.init_weights(torch.Generator().manual_seed(recipe.seed))
    model.to(device).train()
    opt = adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    config_hash = sha256_json(config_of(recipe))
    ckpt_dir = out / "checkpoints"
    start, resumed_losses = 0, []
    resume = latest_checkpoint(ckpt_dir, config_hash)
    if resume is not None:
        from safetensors.torch import load_file

        state = load_file(resume / "model.safetensors")
        model.load_state_dict(state, strict=not args.tie_embeddings)
        state = load_trainer_state(resume, opt)
        start = state["step"]
        resumed_losses = state.get("interval_losses", [])
        console.print(f"resuming from {resume} (step {start})")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    console.print(f"model: {args.num_params() / 1e6:.2f}M parameters, {args.num_layers} layers, hidden {args.hidden_size}, "
                  f"vocab {args.vocab_size}; {tokens_per_step:,} tokens/step on {device}; "
                  f"train tokens {len(train_tokens):,}")
    log = MetricsLog(out / "metrics.jsonl", resume_step=start)

    step, loss_val, last_val = start, float("nan"), None
    interval_losses: list[float] = list(resumed_losses)  # a resumed interval continues its mean
    train_loss = float("nan")  # the mean over the last logging interval
    t_log, tokens_since = time.perf_counter(), 0
    previous_term = _sigterm_as_interrupt()

    def save(path: Path, at_step: int) -> None:
        save_checkpoint(path, model, opt, at_step, config_hash, tok_dir, [ids["end"]],
                        extra={"interval_losses": list(interval_losses)})

    try:
        with progress("loss {task.fields[loss]:.3f} · {task.fields[tps]:,.0f} tok/s") as bar:
            task = bar.add_task("pretrain", total=cfg.max_steps, completed=start, loss=float("nan"), tps=0.0)
            while step < cfg.max_steps:
                lr = cosine_lr(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
                set_lr(opt, lr)
                loss_sum = 0.0
                for micro in range(cfg.grad_accum):
                    x, y = batch_at(train_tokens, recipe.seed, step, micro, cfg.batch_size, cfg.seq_len)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    with autocast(device):
                        logits = model(x)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.item()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                loss_val = loss_sum / cfg.grad_accum
                if not math.isfinite(loss_val):
                    raise UserError(f"pretrain: loss became {loss_val} at step {step}; lower pretrain.lr (now {cfg.lr})")
                tokens_since += tokens_per_step
                interval_losses.append(loss_val)
                record = None
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    now = time.perf_counter()
                    tps = tokens_since / (now - t_log)
                    t_log, tokens_since = now, 0
                    # The mean over the interval: one small batch's loss is too noisy to read a curve from.
                    train_loss = sum(interval_losses) / len(interval_losses)
                    interval_losses.clear()
                    record = {"step": step, "loss": round(train_loss, 5), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                              "tokens": step * tokens_per_step, "tokens_per_s": round(tps, 1)}
                    bar.update(task, tps=tps)
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    last_val = val_loss(model, val_tokens, cfg.seq_len, cfg.eval_batches, cfg.batch_size, device)
                    record = {**(record or {"step": step}), "val_loss": round(last_val, 5)}
                    console.print(f"step {step}: train loss {train_loss:.4f}, val loss {last_val:.4f}")
                if record:
                    log.log(record)
                if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    save(ckpt_dir / f"step_{step:07d}", step)
                    prune(ckpt_dir, cfg.keep_checkpoints)
                bar.update(task, completed=step, loss=loss_val)
                if on_step is not None:
                    on_step(step)
    except KeyboardInterrupt:
        if step > start:
            save(ckpt_dir / f"step_{step:07d}", step)
            console.print(f"interrupted at step {step}: checkpoint saved; run the same command again to resume")
        raise
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    save(out / "final", step)
    plot_curves(out / "metrics.jsonl", out / "loss.png", "pretraining")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "tokens_per_s" in r]
    return {"steps": step, "final_loss": round(train_loss, 5), "val_loss": round(last_val, 5) if last_val else None,
            "parameters": args.num_params(), "tokens_seen": step * tokens_per_step,
            "tokens_per_s": round(float(np.median([r["tokens_per_s"] for r in rows])), 1) if rows else None,
            "device": str(device), "resumed_from": start or None}
