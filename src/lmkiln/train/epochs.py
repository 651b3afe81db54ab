"""The epochs every fine-tuning task trains by, around the training loop (train/loop.py): batches of similar
length drawn epoch by epoch, the overfitting guards (validation on a schedule, early stopping, the best
state kept), the model made trainable (LoRA or DoRA, gradient checkpointing), and checkpoints of the
trainable tensors that resume bit for bit."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmkiln.config import FinetuneConfig
from lmkiln.errors import UserError
from lmkiln.eval.during import describe
from lmkiln.io import atomic_dir
from lmkiln.log import console
from lmkiln.model.families import family_of
from lmkiln.model.io.chat_format import ChatFormat
from lmkiln.model.io.checks import require_same_format
from lmkiln.model.io.hub import load_model, save_model
from lmkiln.model.lora import apply_lora, merge_lora, save_adapter
from lmkiln.runs import FINAL
from lmkiln.train import dist
from lmkiln.train.checkpoint import (
    TRAINABLE,
    latest_checkpoint,
    prune,
    read_training_state,
    save_training_state,
    set_rng_state,
)
from lmkiln.train.dist import DistContext
from lmkiln.train.loop import Cadence, LoopState, Plan, train
from lmkiln.train.metrics import Tracker
from lmkiln.train.optim import adamw, cosine_lr


class Validation:
    """The overfitting guards: a validation pass on a schedule, the best state kept, early stopping after
    `patience` evaluations without improvement, and a warning when training loss keeps falling while
    validation loss rises. `evaluate` returns {"loss": ..., other metrics}; `on_eval(step, loss)` is
    told each result (`kiln tune` prunes from it). A run starts it (`begin`: the base model's score) or,
    resuming, restores it (`load`)."""

    FIELDS = ("base", "best", "best_state", "best_epoch", "best_step", "history", "waited", "stopped", "diverged")

    def __init__(
        self,
        model: nn.Module,
        evaluate: Callable[[], dict],
        cfg,
        on_eval: Callable[[int, float], None] | None = None,
        tasks: Callable[[], dict] | None = None,
    ) -> None:
        self.model, self.cfg, self.on_eval = model, cfg, on_eval
        # in-context task scores (eval/TASK/METRIC) ride along with each validation; only the loss guards
        self.evaluate = evaluate if tasks is None else (lambda: {**evaluate(), **tasks()})
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.base: dict = {}
        self.best: dict = {}
        self.best_state, self.best_epoch, self.best_step = None, 0, 0
        self.history: list[tuple[float, float]] = []  # (mean train loss since the last check, val loss)
        self.waited, self.stopped, self.diverged = 0, False, False

    def begin(self, track: Tracker) -> None:
        """Score the base model: the mark every later evaluation must beat."""
        self.base = self.best = self.evaluate()
        track({"step": 0, "epoch": 0, **self._rounded(self.base)})
        console.print(f"base model: {self._describe(self.base)}")

    def state(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load(self, state: dict) -> None:
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

    def check(self, step: int, epoch: int, train: float) -> tuple[dict, bool]:
        """Evaluate now, given the mean training loss since the last check: (what to log, whether to stop)."""
        res = self.evaluate()
        vloss = res["loss"]
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
                console.print(
                    "[yellow]warning: training loss falls while validation loss rises: the model is "
                    "overfitting (fewer epochs, a lower lr, or finetune.patience)[/yellow]"
                )
        if self.on_eval is not None:
            self.on_eval(step, vloss)
        if self.cfg.patience and self.waited >= self.cfg.patience:
            console.print(
                f"stopping early: {self.waited} evaluations without improvement; keeping step {self.best_step}"
            )
            self.stopped = True
        return self._rounded(res), self.stopped

    def restore_best(self) -> bool:
        """Load the best state into the model; False when nothing beat the base model."""
        if self.best_state is None:
            return False
        self.model.load_state_dict(self.best_state, strict=False)
        return True

    def summary(self) -> dict:
        return {
            "base_val_loss": round(self.base["loss"], 5),
            "best_val_loss": round(self.best["loss"], 5),
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "stopped_early": self.stopped,
            "overfit_warning": self.diverged,
            **(
                {"base_eval_tasks": tasks_of(self.base), "best_eval_tasks": tasks_of(self.best)}
                if tasks_of(self.base)
                else {}
            ),
        }


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
        chunk = sorted(order[w : w + window], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def make_trainable(model: nn.Module, cfg) -> int:
    """LoRA/DoRA adapters when the recipe asks (everything else frozen), gradient checkpointing;
    returns the trainable parameter count."""
    if cfg.method == "lora":
        lo = cfg.lora
        targets = lo.targets
        family_targets = family_of(model.args).lora_targets
        if family_targets and not set(targets) & set(family_targets):
            targets = family_targets  # a decoder's projection names mean nothing on an encoder or T5
        wrapped = apply_lora(model, targets, lo.r, lo.alpha, lo.dropout, lo.dora)
        console.print(f"{'DoRA' if lo.dora else 'LoRA'} r={lo.r} on {len(wrapped)} layers")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_always(params) -> int:
    """A label head trains whatever the method (LoRA freezes the rest): the parameters it newly made
    trainable, counted."""
    added = 0
    for p in params:
        added += 0 if p.requires_grad else p.numel()
        p.requires_grad_(True)
    return added


def load_trainable(base_dir: Path, cfg, device) -> tuple[nn.Module, int]:
    """The base model on `device`, made trainable as the recipe says; and its trainable parameter count."""
    model = load_model(base_dir, device)
    trainable = make_trainable(model, cfg)
    model.to(device)
    console.print(f"trainable parameters: {trainable / 1e6:.2f}M")
    return model, trainable


def save_tuned(model, guard: Validation, cfg, base_dir: Path, tok, out: Path, device) -> None:
    """The best weights as a model directory (and, for LoRA/DoRA, the adapter in PEFT's layout)."""
    if not guard.restore_best():
        console.print(
            "[yellow]warning: no evaluation improved on the base model's validation loss; keeping the base weights[/yellow]"
        )
        model = load_model(base_dir, device)
        make_trainable(model, cfg)
    if cfg.method == "lora":
        with atomic_dir(out / "adapter") as tmp:
            lo = cfg.lora
            save_adapter(model, tmp, str(base_dir), lo.r, lo.alpha, lo.dropout, lo.targets, lo.dora)
        merge_lora(model)
    with atomic_dir(out / FINAL) as tmp:
        save_model(model, tmp, base_dir, sorted(ChatFormat(base_dir).stop_ids))
        require_same_format(base_dir, tmp)


@dataclass
class Checkpoints:
    """Where a fine-tune keeps its resumable state, how often (every `every` optimizer steps, the last
    `keep` of them) and the identity (config and inputs) a checkpoint must carry to be resumed."""

    dir: Path
    key: str
    every: int
    keep: int


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def _resume(plan: Checkpoints | None, model: nn.Module, opt, guard: Validation) -> tuple[int, LoopState | None]:
    """Load the newest checkpoint of this run into the model, optimizer and guard: (its step, the loop's
    state), or (0, None) for a fresh start."""
    path = latest_checkpoint(plan.dir, plan.key, weights=TRAINABLE) if plan is not None else None
    if path is None:
        return 0, None
    tensors, state = read_training_state(path)
    if set(tensors) != set(_trainable_state(model)):
        raise UserError(f"{path}: the checkpoint's trainable tensors differ from this run's; remove it to start over")
    model.load_state_dict(tensors, strict=False)
    opt.load_state_dict(state["optimizer"])
    guard.load(state["guard"])
    set_rng_state(state["rng"])
    console.print(f"resuming from {path} (step {state['step']})")
    return state["step"], LoopState(**state["loop"])


def _saver(
    checkpoints: Checkpoints, model: nn.Module, opt: torch.optim.Optimizer, guard: Validation, ctx: DistContext
) -> Callable[[int, dict], None]:
    """The loop's `save(step, loop_state)`: the trainable tensors, optimizer, guard and loop state as
    `step_N/` (the main rank writes, the last `keep` stay), then every rank waits for it."""

    def save(step: int, loop: dict) -> None:
        if ctx.is_main:
            save_training_state(
                checkpoints.dir / f"step_{step:07d}",
                _trainable_state(model),
                {
                    "config_hash": checkpoints.key,
                    "optimizer": opt.state_dict(),
                    "guard": guard.state(),
                    "step": step,
                    "loop": loop,
                },
            )
            prune(checkpoints.dir, checkpoints.keep)
        dist.barrier(ctx)

    return save


def epoch_steps(lengths: list[int], batch_size: int, per_step: int, epochs: int, seed: int) -> list[tuple[int, list]]:
    """Every optimizer step of the run as (epoch, its micro-batches of example indices), drawn up front
    from one generator: the order is a function of the seed alone, so resume needs only the step."""
    order, steps = random.Random(seed), []
    for epoch in range(1, epochs + 1):
        micro = length_grouped_batches(lengths, batch_size, order)
        steps += [(epoch, micro[s : s + per_step]) for s in range(0, len(micro), per_step)]
    return steps


@dataclass
class EpochPlan:
    """What the epochs train on: `items` (examples, pairs or indices) with their `lengths` (batches group
    similar lengths), `loss(net, batch) -> (summed loss, tokens)`, and `weight(batch)`, what a step's
    summed loss is divided by (trained tokens, pairs, examples); `name` labels progress and the metrics,
    `seed` draws the order."""

    items: list
    lengths: list[int]
    loss: Callable[[nn.Module, list], tuple[torch.Tensor, int]]
    weight: Callable[[list], int]
    name: str
    seed: int
    extras: Callable[[], dict] | None = None  # figures of the task's own, logged with each interval


def run_epochs(
    model: nn.Module,
    cfg: FinetuneConfig,
    spec: EpochPlan,
    guard: Validation,
    out: Path,
    ctx: DistContext | None = None,
    checkpoints: Checkpoints | None = None,
) -> dict[str, Any]:
    """Train for the recipe's epochs, or until the guard stops it. A step's loss is its micro-batches'
    summed losses over the step's total weight. Under torchrun each rank takes every world-th micro-batch
    of the same steps (DDP). With `checkpoints`, the state is saved every N steps and when interrupted,
    and a rerun continues to the weights a run that never stopped reaches."""
    ctx = ctx or DistContext()
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    start, loop_state = _resume(checkpoints, model, opt, guard)
    track = Tracker(out, start, ctx.is_main)
    if loop_state is None:
        guard.begin(track)
    net = dist.wrap(model, "ddp", ctx)
    per_step = cfg.grad_accum * ctx.world
    steps = epoch_steps(spec.lengths, cfg.batch_size, per_step, cfg.epochs, spec.seed)
    horizon = math.ceil(len(spec.items) / (cfg.batch_size * per_step)) * cfg.epochs  # the schedule's length
    epoch_ends = {i + 1 for i in range(len(steps)) if i + 1 == len(steps) or steps[i + 1][0] != steps[i][0]}

    def batch(idx: list[int]) -> list:
        return [spec.items[i] for i in idx]

    plan = Plan(
        spec.name,
        len(steps),
        lambda i: [batch(idx) for idx in steps[i][1][ctx.rank :: ctx.world]],
        weight=lambda i: sum(spec.weight(batch(idx)) for idx in steps[i][1]),
        loss=spec.loss,
        lr=lambda i: cosine_lr(i, horizon, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio),
        idle_batch=lambda i: batch(steps[i][1][0]),
        epoch=lambda done: steps[done - 1][0],
        extras=spec.extras,
    )

    save = _saver(checkpoints, model, opt, guard, ctx) if checkpoints is not None else None
    # without a schedule each epoch ends with a check; with one, the last steps still get one
    cadence = Cadence(
        cfg.log_every,
        lambda s: (
            (cfg.eval_every and s % cfg.eval_every == 0) or s == len(steps) or (not cfg.eval_every and s in epoch_ends)
        ),
        lambda s, since: guard.check(s, steps[s - 1][0], since),
        save,
        checkpoints.every if checkpoints else 0,
        cfg.grad_clip,
        cfg.on_nan,
        key="finetune",
    )
    result = train(plan, cadence, net, model, opt, ctx, track, start, loop_state)
    return {**result.metrics(), "world_size": ctx.world}
