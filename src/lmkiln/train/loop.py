"""The fine-tuning loop every task shares (generate, dpo, classify): batches of similar length, gradient
accumulation weighted by what each micro-batch counts, validation on a schedule with the overfitting
guards, and the model made trainable (LoRA or DoRA, gradient checkpointing) with its memory estimated
before the first step."""

from __future__ import annotations

import math
import random
import time
from typing import Callable

import torch
from torch import nn

from lmkiln.eval.during import describe
from lmkiln.log import console, progress
from lmkiln.model.lora import apply_lora
from lmkiln.train import dist
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


class Validation:
    """The overfitting guards: a validation pass on a schedule, the best state kept, early stopping after
    `patience` evaluations without improvement, and a warning when training loss keeps falling while
    validation loss rises. `evaluate` returns {"loss": ..., other metrics}; `on_eval(step, loss)` is
    told each result (`kiln tune` prunes from it)."""

    def __init__(self, model: nn.Module, evaluate: Callable[[], dict], cfg, log: MetricsLog,
                 on_eval: Callable[[int, float], None] | None = None, tasks: Callable[[], dict] | None = None) -> None:
        self.model, self.cfg, self.log, self.on_eval = model, cfg, log, on_eval
        # in-context task scores (eval/TASK/METRIC) ride along with each validation; only the loss guards
        self.evaluate = evaluate if tasks is None else (lambda: {**evaluate(), **tasks()})
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.base = self.best = self.evaluate()
        self.best_state, self.best_epoch, self.best_step, self.last_step = None, 0, 0, 0
        self.history: list[tuple[float, float]] = []  # (mean train loss since the last check, val loss)
        self.train_losses: list[float] = []
        self.waited, self.stopped, self.diverged = 0, False, False
        log.log({"step": 0, "epoch": 0, **self._rounded(self.base)})
        console.print(f"base model: {self._describe(self.base)}")

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


class NullLog:
    """The metrics log of a rank other than 0: rank 0 alone writes."""

    def log(self, record: dict) -> None:
        pass


def metrics_log(out, ctx: DistContext) -> MetricsLog | NullLog:
    return MetricsLog(out / "metrics.jsonl") if ctx.is_main else NullLog()


# (model to call, batch) -> (summed loss, tokens processed); the model is the DDP wrapper under torchrun
MicroLoss = Callable[[nn.Module, list], tuple[torch.Tensor, int]]


def train_loop(model: nn.Module, cfg, items: list, lengths: list[int], micro_loss: MicroLoss,
               weight: Callable[[list], int], guard: Validation, log, seed: int, name: str,
               ctx: DistContext | None = None) -> dict:
    """Train until the epochs run out or the guard stops it. Each optimizer step's loss is the summed
    micro-batch losses over the step's total `weight` (trained tokens, pairs, examples). Under torchrun
    each rank takes every world-th micro-batch of the same shuffled list, so N ranks with accumulation A
    take the steps one process takes with accumulation N x A."""
    ctx = ctx or DistContext()
    net = dist.wrap(model, "ddp", ctx)
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    per_step = cfg.grad_accum * ctx.world
    max_steps = math.ceil(len(items) / (cfg.batch_size * per_step)) * cfg.epochs
    rng = random.Random(seed)
    step, tokens, t0 = 0, 0, time.perf_counter()
    model.train()
    with progress("loss {task.fields[loss]:.3f} · {task.fields[tps]:,.0f} tok/s") as bar:
        task = bar.add_task(name, total=max_steps, loss=float("nan"), tps=0.0)
        for epoch in range(1, cfg.epochs + 1):
            micro = length_grouped_batches(lengths, cfg.batch_size, rng)
            for s in range(0, len(micro), per_step):
                set_lr(opt, cosine_lr(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio))
                group = micro[s:s + per_step]
                mine = [[items[i] for i in idx] for idx in group[ctx.rank::ctx.world]]
                # DDP averages gradients over ranks: scale by world so the step's loss is the global sum
                # over the global weight, as in one process.
                total = sum(weight([items[i] for i in idx]) for idx in group)
                loss_sum = 0.0
                for k, batch in enumerate(mine):
                    with dist.grad_sync(net, k == len(mine) - 1):
                        loss, n = micro_loss(net, batch)
                        (loss * ctx.world / total).backward()
                    loss_sum += loss.item()
                    tokens += n
                if not mine:  # a short last step left this rank nothing: join the all-reduce with zeros
                    loss, _ = micro_loss(net, [items[i] for i in group[0]])
                    (loss * 0).backward()
                loss_sum = dist.all_sum([loss_sum], ctx)[0]
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                tps = tokens / (time.perf_counter() - t0)
                guard.train_losses.append(loss_sum / total)
                if step % cfg.log_every == 0:
                    log.log({"step": step, "epoch": epoch, "loss": round(loss_sum / total, 5), "tokens_per_s": round(tps, 1)})
                bar.update(task, completed=step, loss=loss_sum / total, tps=tps)
                if cfg.eval_every and step % cfg.eval_every == 0 and guard.check(step, epoch):
                    break
            if guard.stopped:
                break
            # Without a schedule, each epoch ends with a check; with one, the last steps still get one.
            if (not cfg.eval_every or epoch == cfg.epochs) and guard.last_step != step and guard.check(step, epoch):
                break
    model.eval()
    tokens = dist.all_sum([tokens], ctx)[0]
    return {"steps": step, "tokens_per_s": round(tokens / (time.perf_counter() - t0), 1), "world_size": ctx.world}
