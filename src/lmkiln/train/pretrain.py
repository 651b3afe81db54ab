"""`kiln pretrain`: next-token prediction on packed token shards, on one device or under torchrun
(DDP / FSDP2), resumable from the last checkpoint to the exact loss curve."""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lmkiln.config import Recipe
from lmkiln.device import autocast, seed_everything
from lmkiln.errors import UserError
from lmkiln.eval.during import TaskMonitor, describe
from lmkiln.io import sha256_json
from lmkiln.log import console, progress, set_quiet
from lmkiln.model.chat_format import ChatFormat
from lmkiln.model.transformer import ModelArgs, Transformer, build_args
from lmkiln.pipeline import stage_dir, upstream
from lmkiln.tokenizer.encode import open_shard
from lmkiln.tokenizer.train import load_tokenizer, special_ids
from lmkiln.train import dist
from lmkiln.train.checkpoint import latest_checkpoint, prune, read_checkpoint, save_checkpoint
from lmkiln.train.linear_ce import linear_cross_entropy
from lmkiln.train.metrics import MetricsLog, plot_curves, read_metrics
from lmkiln.train.optim import cosine_lr, make_optimizer, set_lr, wsd_lr
from lmkiln.train.speed import device_peak, mfu


def config_of(recipe: Recipe) -> dict:
    cfg = recipe.pretrain.model_dump(mode="json")
    # how a run goes and what it reports, not what it computes
    for key in ("log_every", "tracker", "keep_checkpoints", "stop_after", "eval_tasks", "eval_tasks_max_examples"):
        cfg.pop(key)
    return {"model": recipe.model.model_dump(mode="json"), "pretrain": cfg, "seed": recipe.seed}


def inputs_of(recipe: Recipe, run_dir: Path) -> dict:
    return {"tokenizer": upstream(run_dir, "tokenizer")}


def fim_rearrange(window: np.ndarray, rng: np.random.Generator, prefix: int, middle: int, suffix: int) -> np.ndarray:
    """Fill-in-the-middle (Bavarian et al. 2022, PSM order): cut the window at two random points and
    move the middle span to the end behind sentinels, so next-token prediction learns to fill a gap
    from both sides. The result keeps the window's length (its last 3 tokens fall off)."""
    n = len(window)
    a, b = np.sort(rng.integers(0, n + 1, size=2))
    out = np.concatenate([[prefix], window[:a], [suffix], window[b:], [middle], window[a:b]])
    return out[:n]


def batch_at(tokens: np.ndarray, seed: int, step: int, micro: int, batch: int, seq_len: int,
             fim: tuple[float, int, int, int] | None = None):
    """The micro-batch of a step: random windows drawn from a generator keyed by (seed, step, micro).
    The data position is the step number, so resume needs no sampler state; under torchrun rank r
    draws micro-batch `micro * world + r`, so N ranks see what one process with N× accumulation sees.
    `fim` = (rate, prefix id, middle id, suffix id) rearranges that share of the windows."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
    windows = [np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts]
    if fim is not None and fim[0] > 0:
        windows = [fim_rearrange(w, rng, *fim[1:]) if rng.random() < fim[0] else w for w in windows]
    chunk = torch.from_numpy(np.stack(windows))
    return chunk[:, :-1], chunk[:, 1:]


def next_token_loss(run: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of every next token; `run` is what runs the forward (maybe compiled), `model` what
    owns the parameters. The LM head runs inside the loss a chunk of rows at a time (train/linear_ce.py):
    the tokens x vocabulary logits are never whole in memory, the softmax and both head gradients are
    taken while a chunk is in cache, and the step is faster for it. Under FSDP the head's weight is whole
    only inside the model's own forward, so there the model runs its head."""
    if dist.is_sharded(model):
        return F.cross_entropy(run(x).float().flatten(0, 1), y.flatten(), reduction=reduction)
    hidden = run(x, hidden_only=True)
    losses = linear_cross_entropy(hidden.flatten(0, 1), dist.unwrap(model).lm_head.weight, y.flatten())
    return losses.sum() if reduction == "sum" else losses.mean()


@torch.no_grad()
def val_loss(model, tokens: np.ndarray, seq_len: int, batches: int, batch: int, ctx: dist.DistContext) -> float:
    """Mean loss over fixed evenly spaced windows of the validation tokens, split across ranks."""
    model.eval()
    n = min(batches * batch, max(1, (len(tokens) - 1) // seq_len))
    n = max(ctx.world, n - n % ctx.world)  # equal work per rank: FSDP's forward is collective
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)[ctx.rank::ctx.world]
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        chunk = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts[i:i + batch]]).astype(np.int64))
        x, y = chunk[:, :-1].to(ctx.device), chunk[:, 1:].to(ctx.device)
        with autocast(ctx.device):
            total += next_token_loss(model, model, x, y, reduction="sum").item()
        count += y.numel()
    model.train()
    total, count = dist.all_sum([total, count], ctx)
    return total / count


def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's preemption, `kill`) saves a checkpoint like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _grad_accum(recipe: Recipe, world: int) -> int:
    cfg = recipe.pretrain
    if cfg.batch_tokens is None:
        return cfg.grad_accum
    per_micro = cfg.batch_size * cfg.seq_len * world
    return max(1, math.ceil(cfg.batch_tokens / per_micro))


def _check(recipe: Recipe, train_tokens: np.ndarray, val_tokens: np.ndarray, ids: dict) -> None:
    cfg = recipe.pretrain
    if len(train_tokens) <= cfg.seq_len + 1:
        raise UserError(f"pretrain.seq_len={cfg.seq_len} is longer than the training data ({len(train_tokens)} tokens)")
    if len(val_tokens) <= cfg.seq_len + 1:
        raise UserError(f"pretrain.seq_len={cfg.seq_len} is longer than the validation split ({len(val_tokens)} tokens); "
                        f"raise data.val_fraction or lower pretrain.seq_len")
    if cfg.seq_len > recipe.model.max_seq_len:
        raise UserError(f"pretrain.seq_len={cfg.seq_len} exceeds model.max_seq_len={recipe.model.max_seq_len}")
    if cfg.fim_rate > 0 and ids.get("fim_prefix") is None:
        raise UserError("pretrain.fim_rate needs a tokenizer with FIM tokens: rerun `kiln tokenizer --force`")
    if cfg.optimizer == "muon" and cfg.strategy == "fsdp":
        raise UserError("pretrain.optimizer=muon with pretrain.strategy=fsdp is not supported: Muon needs whole matrices")


def _make_model(recipe: Recipe, vocab_size: int, ids: dict, ctx: dist.DistContext) -> tuple[Transformer, ModelArgs]:
    try:
        args = build_args(recipe.model, vocab_size, ids)
    except ValueError as exc:
        raise UserError(f"model: {exc}") from None
    seed_everything(recipe.seed)
    model = Transformer(args)
    model.init_weights(torch.Generator().manual_seed(recipe.seed))
    return model.to(ctx.device).train(), args


class Tracker:
    """metrics.jsonl always (rank 0); TensorBoard events too when asked."""

    def __init__(self, out: Path, kind: str, resume_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.log = MetricsLog(out / "metrics.jsonl", resume_step=resume_step) if enabled else None
        self.tb = None
        if enabled and kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("pretrain.tracker=tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step or None)

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        self.log.log(record)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def build(recipe: Recipe, run_dir: Path, out: Path, on_step=None) -> dict:
    ctx = dist.setup(recipe.pretrain.device)
    if not ctx.is_main:
        set_quiet(True)
    try:
        return _train(recipe, run_dir, out, ctx, on_step)
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of GPU memory: lower pretrain.batch_size (now {recipe.pretrain.batch_size}) and raise "
                        f"pretrain.grad_accum, lower pretrain.seq_len, or shard with pretrain.strategy=fsdp") from None
    finally:
        dist.teardown(ctx)


def _train(recipe: Recipe, run_dir: Path, out: Path, ctx: dist.DistContext, on_step) -> dict:
    cfg = recipe.pretrain
    tok_dir = stage_dir(run_dir, "tokenizer")
    train_tokens, header = open_shard(tok_dir / "train")
    val_tokens, _ = open_shard(tok_dir / "val")
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    _check(recipe, train_tokens, val_tokens, ids)
    monitor = TaskMonitor(cfg.eval_tasks, recipe, cfg.eval_tasks_max_examples) if cfg.eval_tasks else None
    model, args = _make_model(recipe, header["vocab_size"], ids, ctx)
    config_hash = sha256_json(config_of(recipe))
    ckpt_dir = out / "checkpoints"
    dist.barrier(ctx)  # every rank looks for checkpoints only after rank 0 has cleared a --force run
    resume = latest_checkpoint(ckpt_dir, config_hash)
    model = dist.wrap(model, cfg.strategy, ctx)
    opt = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    start, carried = 0, []
    if resume is not None:
        model_state, state = read_checkpoint(resume)
        dist.load_full_state(model, opt, model_state, state["optimizer"])
        start, carried = state["step"], state.get("interval_losses", [])
        console.print(f"resuming from {resume} (step {start})")
    step_model = torch.compile(model) if cfg.compile else model
    accum = _grad_accum(recipe, ctx.world)
    tokens_per_step = cfg.batch_size * accum * cfg.seq_len * ctx.world
    flops_per_token = args.flops_per_token(cfg.seq_len)
    peak, peak_source = device_peak(ctx.device)
    console.print(f"model: {args.arch}, {args.num_params() / 1e6:.2f}M parameters, {args.num_layers} layers, "
                  f"hidden {args.hidden_size}, vocab {args.vocab_size}; {flops_per_token / 1e6:.1f} MFLOPs/token")
    console.print(f"batch: {tokens_per_step:,} tokens/step ({cfg.batch_size} × {cfg.seq_len} × {accum} accum × "
                  f"{ctx.world} rank{'s' if ctx.world > 1 else ''}) on {ctx.device}"
                  + (f", {cfg.strategy}" if ctx.enabled else "")
                  + (f"; peak {peak / 1e9:,.0f} GFLOP/s ({peak_source})" if peak else f"; {peak_source}"))
    track = Tracker(out, cfg.tracker, start, ctx.is_main)

    def save(path: Path, at_step: int, interval: list[float]) -> None:
        model_state, optim_state = dist.full_state(model, opt)  # collective
        if ctx.is_main:
            save_checkpoint(path, args, model_state, optim_state, at_step, config_hash, tok_dir, [ids["end"]],
                            extra={"interval_losses": list(interval)})
        dist.barrier(ctx)

    loop = _Loop(recipe, ctx, step_model, model, opt, train_tokens, val_tokens, accum, tokens_per_step,
                 flops_per_token, peak, track, save, ckpt_dir, on_step, monitor, tok, ChatFormat(tok_dir),
                 fim=(cfg.fim_rate, ids["fim_prefix"], ids["fim_middle"], ids["fim_suffix"]) if cfg.fim_rate else None)
    step, train_loss, last_val = loop.run(start, carried)
    save(out / "final", step, [])
    track.close()
    if ctx.is_main:
        plot_curves(out / "metrics.jsonl", out / "loss.png", "pretraining")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "tokens_per_s" in r] if ctx.is_main else []
    tps = float(np.median([r["tokens_per_s"] for r in rows])) if rows else None
    util = mfu(tps, flops_per_token, peak, ctx.world) if tps else None
    return {"steps": step, "final_loss": round(train_loss, 5), "val_loss": round(last_val, 5) if last_val else None,
            "parameters": args.num_params(), "tokens_seen": step * tokens_per_step,
            "tokens_per_s": round(tps, 1) if tps else None, "mfu": round(util, 4) if util else None,
            "device": str(ctx.device), "world_size": ctx.world, "resumed_from": start or None,
            **({"eval_tasks": loop.last_scores} if loop.last_scores else {})}


@dataclass
class _Loop:
    """The optimisation loop, its logging, evaluation and checkpoint cadence."""

    recipe: Recipe
    ctx: dist.DistContext
    step_model: torch.nn.Module  # what runs the forward (maybe compiled)
    model: torch.nn.Module  # what owns the parameters (maybe DDP/FSDP-wrapped)
    opt: object
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    accum: int
    tokens_per_step: int
    flops_per_token: float
    peak: float | None
    track: Tracker
    save: Callable[[Path, int, list], None]
    ckpt_dir: Path
    on_step: Callable[[int], None] | None
    monitor: TaskMonitor | None = None
    tok: object = None
    chat: object = None  # the tokenizer's format (ChatFormat): its bos/eos for the task monitor
    fim: tuple[float, int, int, int] | None = None
    last_scores: dict | None = None
    _pool: object = None
    _pending: tuple | None = None

    @property
    def cfg(self):
        return self.recipe.pretrain

    def lr_at(self, step: int) -> float:
        c = self.cfg
        if c.schedule == "wsd":
            return wsd_lr(step, c.max_steps, c.lr, c.warmup_steps, c.min_lr_ratio, c.decay_fraction)
        return cosine_lr(step, c.max_steps, c.lr, c.warmup_steps, c.min_lr_ratio)

    def host_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of a step, in host memory (pinned on CUDA for async copies)."""
        c, ctx = self.cfg, self.ctx
        out = []
        for micro in range(self.accum):
            x, y = batch_at(self.train_tokens, self.recipe.seed, step, micro * ctx.world + ctx.rank,
                            c.batch_size, c.seq_len, self.fim)
            out.append((x.pin_memory(), y.pin_memory()) if ctx.device.type == "cuda" else (x, y))
        return out

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """On an accelerator the next step's batches are read on a thread while this step computes (the
        sampler is a pure function of the step, so order and resume are unchanged); on CPU the cores
        are busy with the step itself, so batches are read in line."""
        if self.ctx.device.type == "cpu":
            return self.host_batches(step)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmkiln-loader")
        pending = self._pending if self._pending is not None and self._pending[0] == step else None
        current = pending[1].result() if pending else self.host_batches(step)
        if step + 1 < self.cfg.max_steps:
            self._pending = (step + 1, self._pool.submit(self.host_batches, step + 1))
        return current

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step over `accum` micro-batches; returns (mean loss over ranks, grad norm)."""
        c, ctx = self.cfg, self.ctx
        loss_sum = 0.0
        for micro, (x, y) in enumerate(self.batches(step)):
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with dist.grad_sync(self.model, micro == self.accum - 1), autocast(ctx.device):
                loss = next_token_loss(self.step_model, self.model, x, y)
                (loss / self.accum).backward()
            loss_sum += loss.item()
        loss_val = dist.all_mean(loss_sum / self.accum, ctx)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip if c.grad_clip > 0 else math.inf)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if math.isfinite(loss_val) and math.isfinite(norm):
            self.opt.step()
        elif c.on_nan == "stop":
            raise UserError(f"pretrain: loss became {loss_val} at step {step + 1}; the last checkpoint is kept. "
                            f"Lower pretrain.lr (now {c.lr}) or set pretrain.on_nan=skip")
        else:
            console.print(f"[yellow]step {step + 1}: non-finite loss or gradient, batch skipped[/yellow]")
        self.opt.zero_grad(set_to_none=True)
        return loss_val, norm

    def run(self, start: int, carried: list[float]) -> tuple[int, float, float | None]:
        c = self.cfg
        step, last_val, train_loss = start, None, float("nan")
        interval = list(carried)  # a resumed interval continues its mean
        t_log, tokens_since = time.perf_counter(), 0
        previous_term = _sigterm_as_interrupt()
        try:
            with progress("loss {task.fields[loss]:.3f} · {task.fields[tps]:,.0f} tok/s · MFU {task.fields[mfu]}") as bar:
                task = bar.add_task("pretrain", total=c.max_steps, completed=start, loss=float("nan"), tps=0.0, mfu="–")
                while step < c.max_steps:
                    lr = self.lr_at(step)
                    set_lr(self.opt, lr)
                    loss_val, norm = self.train_step(step)
                    step += 1
                    if math.isfinite(loss_val):
                        interval.append(loss_val)
                    tokens_since += self.tokens_per_step
                    # the bar shows the interval under way from its first step: its mean loss and rate
                    now = time.perf_counter()
                    tps = tokens_since / max(now - t_log, 1e-9)
                    util = mfu(tps, self.flops_per_token, self.peak, self.ctx.world)
                    bar.update(task, loss=sum(interval) / len(interval) if interval else loss_val, tps=tps,
                               mfu=f"{util:.0%}" if util is not None else "–")
                    record = None
                    if (step % c.log_every == 0 or step == c.max_steps) and interval:
                        t_log, tokens_since = now, 0
                        # The mean over the interval: one small batch's loss is too noisy to read a curve from.
                        train_loss = sum(interval) / len(interval)
                        interval.clear()
                        record = {"step": step, "loss": round(train_loss, 5), "lr": lr, "grad_norm": round(norm, 4),
                                  "tokens": step * self.tokens_per_step, "tokens_per_s": round(tps, 1)}
                        if util is not None:
                            record["mfu"] = round(util, 4)
                    if step % c.eval_every == 0 or step == c.max_steps:
                        last_val = val_loss(self.model, self.val_tokens, c.seq_len, c.eval_batches, c.batch_size, self.ctx)
                        record = {**(record or {"step": step}), "val_loss": round(last_val, 5)}
                        message = f"step {step}: train loss {train_loss:.4f}, val loss {last_val:.4f}"
                        if self.monitor is not None:
                            scores = self.monitor(dist.unwrap(self.model), self.tok, self.chat)
                            record.update(scores)
                            self.last_scores = scores
                            message += f"; {describe(scores)}"
                        console.print(message)
                    if record:
                        self.track(record)
                    if step % c.checkpoint_every == 0 and step < c.max_steps:
                        self.save(self.ckpt_dir / f"step_{step:07d}", step, interval)
                        if self.ctx.is_main:
                            prune(self.ckpt_dir, c.keep_checkpoints)
                    bar.update(task, completed=step)
                    if self.on_step is not None:
                        self.on_step(step)
                    if c.stop_after is not None and step == c.stop_after and step < c.max_steps:
                        raise KeyboardInterrupt  # a planned stop: the same checkpoint as Ctrl-C
        except KeyboardInterrupt:
            if step > start:
                self.save(self.ckpt_dir / f"step_{step:07d}", step, interval)
                console.print(f"interrupted at step {step}: checkpoint saved; run the same command again to resume")
            raise
        finally:
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
        return step, train_loss, last_val
