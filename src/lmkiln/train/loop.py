"""The fine-tuning loop every task shares (generate, dpo, classify): batches of similar length, gradient
accumulation weighted by what each micro-batch counts, validation on a schedule with the overfitting
guards, and the model made trainable (LoRA or DoRA, gradient checkpointing) with its memory estimated
before the first step."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lmkiln.errors import UserError
from lmkiln.eval.during import describe
from lmkiln.log import console, progress
from lmkiln.model.lora import apply_lora
from lmkiln.train import dist
from lmkiln.train.checkpoint import (TRAINABLE, latest_checkpoint, prune, read_training_state, save_training_state,
                                     set_rng_state, stop_at_step_end)
from lmkiln.train.dist import DistContext, unwrap
from lmkiln.train.formats import IGNORE
from lmkiln.train.linear_ce import linear_cross_entropy
from lmkiln.train.metrics import MetricsLog
from lmkiln.train.optim import adamw, cosine_lr, set_lr


def trained_token_losses(model, x: torch.Tensor, y: torch.Tensor,
                         segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy at the trained positions only, and the row of each. The LM head runs on those
    positions alone (prompts, padding and untrained turns never become logits), a chunk at a time
    (train/linear_ce.py), so the vocabulary-sized logits are never in memory whole."""
    hidden = model(x, segments=segments, hidden_only=True)
    rows, cols = (y != IGNORE).nonzero(as_tuple=True)
    head = unwrap(model).lm_head.weight
    return linear_cross_entropy(hidden[rows, cols], head, y[rows, cols]), rows


class NullLog:
    """The metrics log of a rank other than 0 (rank 0 alone writes), and of a guard not yet begun."""

    def log(self, record: dict) -> None:
        pass


class Validation:
    """The overfitting guards: a validation pass on a schedule, the best state kept, early stopping after
    `patience` evaluations without improvement, and a warning when training loss keeps falling while
    validation loss rises. `evaluate` returns {"loss": ..., other metrics}; `on_eval(step, loss)` is
    told each result (`kiln tune` prunes from it). The loop starts it (`begin`: the base model's score)
    or, resuming, restores it (`load`)."""

    FIELDS = ("base", "best", "best_state", "best_epoch", "best_step", "last_step", "history", "train_losses",
              "waited", "stopped", "diverged")

    def __init__(self, model: nn.Module, evaluate: Callable[[], dict], cfg,
                 on_eval: Callable[[int, float], None] | None = None, tasks: Callable[[], dict] | None = None) -> None:
        self.model, self.cfg, self.on_eval = model, cfg, on_eval
        # in-context task scores (eval/TASK/METRIC) ride along with each validation; only the loss guards
        self.evaluate = evaluate if tasks is None else (lambda: {**evaluate(), **tasks()})
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.log: MetricsLog | NullLog = NullLog()
        self.base: dict = {}
        self.best: dict = {}
        self.best_state, self.best_epoch, self.best_step, self.last_step = None, 0, 0, 0
        self.history: list[tuple[float, float]] = []  # (mean train loss since the last check, val loss)
        self.train_losses: list[float] = []
        self.waited, self.stopped, self.diverged = 0, False, False

    def begin(self, log) -> None:
        """Score the base model: the mark every later evaluation must beat."""
        self.log = log
        self.base = self.best = self.evaluate()
        log.log({"step": 0, "epoch": 0, **self._rounded(self.base)})
        console.print(f"base model: {self._describe(self.base)}")

    def state(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load(self, state: dict, log) -> None:
        self.log = log
        for name in self.FIELDS:
            setattr(self, name, state[name])

    @staticmethod
    def _rounded(res: dict) -> dict:
        return {**{f"val_{k}": round(v, 5) for k, v in res.items() if not k.startswith("eval/")}, **tasks_of(res)}

    @staticmethod
    def _describe(res: dict) -> str:
        own = ", ".join(f"val {k.replace('_', ' ')} {v:.4f}" for k, v in res.items() if not k.startswith("eval/"))
        tasks = describe({k: v for k, v in res.items() if k.startswith("eval/")})
        return own + (f"; {tasks}" if tasks else "")

    def check(self, step: int, epoch: int) -> bool:
        """Evaluate now; True when training should stop."""
        res = self.evaluate()
        vloss, self.last_step = res["loss"], step
        train = sum(self.train_losses) / max(len(self.train_losses), 1)
        self.train_losses = []
        self.log.log({"step": step, "epoch": epoch, **self._rounded(res)})
        improved = vloss < self.best["loss"]
        console.print(f"step {step} (epoch {epoch}): {self._describe(res)}" + (" (best)" if improved else ""))
        if improved:
            keep = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in self.trainable}
            self.best, self.best_state, self.best_epoch, self.best_step, self.waited = res, keep, epoch, step, 0
        else:
            self.waited += 1
        self.history.append((train, vloss))
        if len(self.history) >= 3 and not self.diverged:
            (t0, v0), (t1, v1), (t2, v2) = self.history[-3:]
            if t2 < t1 < t0 and v2 > v1 > v0:
                self.diverged = True
                console.print("[yellow]warning: training loss falls while validation loss rises: the model is "
                              "overfitting (fewer epochs, a lower lr, or finetune.patience)[/yellow]")
        if self.on_eval is not None:
            self.on_eval(step, vloss)
        if self.cfg.patience and self.waited >= self.cfg.patience:
            console.print(f"stopping early: {self.waited} evaluations without improvement; "
                          f"keeping step {self.best_step}")
            self.stopped = True
        return self.stopped

    def restore_best(self) -> bool:
        """Load the best state into the model; False when nothing beat the base model."""
        if self.best_state is None:
            return False
        self.model.load_state_dict(self.best_state, strict=False)
        return True

    def summary(self) -> dict:
        return {"base_val_loss": round(self.base["loss"], 5), "best_val_loss": round(self.best["loss"], 5),
                "best_epoch": self.best_epoch, "best_step": self.best_step,
                "stopped_early": self.stopped, "overfit_warning": self.diverged,
                **({"base_eval_tasks": tasks_of(self.base), "best_eval_tasks": tasks_of(self.best)}
                   if tasks_of(self.base) else {})}


def tasks_of(res: dict) -> dict:
    return {k: round(v, 5) for k, v in res.items() if k.startswith("eval/")}


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length examples: shuffle, sort within windows of 50 batches, cut,
    shuffle the batches. Padding drops several-fold while the order stays random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lengths.__getitem__)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def make_trainable(model: nn.Module, cfg) -> int:
    """LoRA/DoRA adapters when the recipe asks (everything else frozen), gradient checkpointing;
    returns the trainable parameter count."""
    if cfg.method == "lora":
        lo = cfg.lora
        wrapped = apply_lora(model, lo.targets, lo.r, lo.alpha, lo.dropout, lo.dora)
        console.print(f"{'DoRA' if lo.dora else 'LoRA'} r={lo.r} on {len(wrapped)} layers")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def metrics_log(out, ctx: DistContext, resume_step: int = 0) -> MetricsLog | NullLog:
    return MetricsLog(out / "metrics.jsonl", resume_step) if ctx.is_main else NullLog()


# (model to call, batch) -> (summed loss, tokens processed); the model is the DDP wrapper under torchrun
MicroLoss = Callable[[nn.Module, list], tuple[torch.Tensor, int]]


@dataclass
class Checkpoints:
    """Where a fine-tune keeps its resumable state, how often (every `every` optimizer steps, the last
    `keep` of them) and the identity (config and inputs) a checkpoint must carry to be resumed."""

    dir: Path
    key: str
    every: int
    keep: int

    def latest(self) -> Path | None:
        return latest_checkpoint(self.dir, self.key, weights=TRAINABLE)


@dataclass
class Position:
    """Where the loop is: optimizer steps done, the epoch, micro-batches of that epoch done, and the state
    of the batch-order generator when that epoch's batches were drawn."""

    step: int = 0
    epoch: int = 1
    done: int = 0
    order_state: tuple | None = None
    tokens: int = 0


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def _save(plan: Checkpoints, model: nn.Module, opt, guard: Validation, pos: Position, ctx: DistContext) -> None:
    if ctx.is_main:
        save_training_state(plan.dir / f"step_{pos.step:07d}", _trainable_state(model),
                            {"config_hash": plan.key, "optimizer": opt.state_dict(), "guard": guard.state(),
                             "position": pos.__dict__})
        prune(plan.dir, plan.keep)
    dist.barrier(ctx)


def _resume(plan: Checkpoints | None, model: nn.Module, opt, out, guard: Validation, ctx: DistContext) -> Position | None:
    """Load the newest checkpoint of this run into the model, optimizer and guard; its position, or None
    (a fresh start: the log begins empty and the guard scores the base model)."""
    path = plan.latest() if plan is not None else None
    if path is None:
        guard.begin(metrics_log(out, ctx))
        return None
    tensors, state = read_training_state(path)
    own = _trainable_state(model)
    if set(tensors) != set(own):
        raise UserError(f"{path}: the checkpoint's trainable tensors differ from this run's; remove it to start over")
    model.load_state_dict(tensors, strict=False)
    opt.load_state_dict(state["optimizer"])
    pos = Position(**state["position"])
    guard.load(state["guard"], metrics_log(out, ctx, resume_step=pos.step))
    set_rng_state(state["rng"])
    console.print(f"resuming from {path} (step {pos.step}, epoch {pos.epoch})")
    return pos


def train_loop(model: nn.Module, cfg, items: list, lengths: list[int], micro_loss: MicroLoss,
               weight: Callable[[list], int], guard: Validation, out: Path, seed: int, name: str,
               ctx: DistContext | None = None, checkpoints: Checkpoints | None = None) -> dict:
    """Train until the epochs run out or the guard stops it. Each optimizer step's loss is the summed
    micro-batch losses over the step's total `weight` (trained tokens, pairs, examples). Under torchrun
    each rank takes every world-th micro-batch of the same shuffled list, so N ranks with accumulation A
    take the steps one process takes with accumulation N x A. With `checkpoints`, the state is saved
    every N steps and when interrupted, and a rerun continues from the newest checkpoint to the same
    weights as a run that never stopped."""
    ctx = ctx or DistContext()
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    pos = _resume(checkpoints, model, opt, out, guard, ctx) or Position()
    net = dist.wrap(model, "ddp", ctx)
    per_step = cfg.grad_accum * ctx.world
    max_steps = math.ceil(len(items) / (cfg.batch_size * per_step)) * cfg.epochs
    order = random.Random(seed)
    start_step, start_tokens, t0 = pos.step, pos.tokens, time.perf_counter()
    interval, interval_tokens, t_interval = [], 0, t0  # the log interval under way: the bar shows its mean
    model.train()
    with progress("loss {task.fields[loss]:.3f} · {task.fields[tps]:,.0f} tok/s") as bar, stop_at_step_end() as stop:
        task = bar.add_task(name, total=max_steps, completed=pos.step, loss=float("nan"), tps=0.0)
        for epoch in range(1, cfg.epochs + 1):
            if epoch < pos.epoch:  # resuming: this epoch is done
                continue
            first = 0
            if epoch == pos.epoch and pos.order_state is not None:  # resuming inside this epoch
                order.setstate(pos.order_state)
                first = pos.done
            pos.epoch, pos.order_state, pos.done = epoch, order.getstate(), first
            micro = length_grouped_batches(lengths, cfg.batch_size, order)
            for s in range(first, len(micro), per_step):
                set_lr(opt, cosine_lr(pos.step, max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio))
                group = micro[s:s + per_step]
                mine = [[items[i] for i in idx] for idx in group[ctx.rank::ctx.world]]
                # DDP averages gradients over ranks: scale by world so the step's loss is the global sum
                # over the global weight, as in one process.
                total = sum(weight([items[i] for i in idx]) for idx in group)
                loss_sum, step_tokens = 0.0, 0
                for k, batch in enumerate(mine):
                    with dist.grad_sync(net, k == len(mine) - 1):
                        loss, n = micro_loss(net, batch)
                        (loss * ctx.world / total).backward()
                    loss_sum += loss.item()
                    step_tokens += n
                if not mine:  # a short last step left this rank nothing: join the all-reduce with zeros
                    loss, _ = micro_loss(net, [items[i] for i in group[0]])
                    (loss * 0).backward()
                # a stop asked on any rank is a stop on all of them, at the same step
                loss_sum, asked = dist.all_sum([loss_sum, float(stop.asked)], ctx)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                pos.step, pos.done = pos.step + 1, s + len(group)
                pos.tokens += step_tokens
                interval.append(loss_sum / total)
                interval_tokens += step_tokens
                now = time.perf_counter()
                tps = interval_tokens / max(now - t_interval, 1e-9)
                guard.train_losses.append(loss_sum / total)
                bar.update(task, completed=pos.step, loss=sum(interval) / len(interval), tps=tps)
                if pos.step % cfg.log_every == 0:
                    guard.log.log({"step": pos.step, "epoch": epoch, "loss": round(sum(interval) / len(interval), 5),
                                   "tokens_per_s": round(tps, 1)})
                    interval, interval_tokens, t_interval = [], 0, now
                if cfg.eval_every and pos.step % cfg.eval_every == 0 and guard.check(pos.step, epoch):
                    break
                if checkpoints is not None and (pos.step % checkpoints.every == 0 or asked):
                    _save(checkpoints, model, opt, guard, pos, ctx)
                if asked:
                    console.print(f"interrupted at step {pos.step}: checkpoint saved; run the same command again to resume"
                                  if checkpoints is not None else f"interrupted at step {pos.step}")
                    raise KeyboardInterrupt
            if guard.stopped:
                break
            # Without a schedule, each epoch ends with a check; with one, the last steps still get one.
            if (not cfg.eval_every or epoch == cfg.epochs) and guard.last_step != pos.step and guard.check(pos.step, epoch):
                break
    model.eval()
    tokens = dist.all_sum([pos.tokens - start_tokens], ctx)[0]
    return {"steps": pos.step, "tokens_per_s": round(tokens / (time.perf_counter() - t0), 1), "world_size": ctx.world,
            "resumed_from": start_step or None}
