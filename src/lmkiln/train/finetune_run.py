"""One fine-tuning run, whatever the task: `FinetuneRun` holds what every task reads (the recipe, the base
model, the splits, the tokenizer and chat format, the output folder, the validation hook, the ranks and
the checkpoints), and `run_task` is the one skeleton around the shared epochs (train/epochs.py): the
guard, the loop, saving the best weights and the curves, the metrics. A task (train/tasks.py's `TASKS`)
supplies only a `Training`: the model, its examples, their loss and weight, and how it is validated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from lmkiln.config import FinetuneConfig, Recipe
from lmkiln.eval.during import TaskMonitor
from lmkiln.model.io.chat_format import ChatFormat
from lmkiln.train.dist import DistContext
from lmkiln.train.epochs import Checkpoints, EpochPlan, Validation, run_epochs, save_tuned
from lmkiln.train.metrics import plot_curves


@dataclass
class FinetuneRun:
    """What a fine-tuning task reads, gathered once by the stage (train/finetune.py)."""

    recipe: Recipe
    base_dir: Path
    splits: dict[str, list[dict]]
    tok: Tokenizer
    out: Path
    ctx: DistContext
    on_eval: Callable[[int, float], None] | None = None  # told each validation loss (`kiln tune` prunes)
    save: bool = True  # False: metrics only (a search trial)
    monitor: TaskMonitor | None = None  # in-training ICL tasks
    checkpoints: Checkpoints | None = None

    @property
    def cfg(self) -> FinetuneConfig:
        return self.recipe.finetune

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @cached_property
    def chat(self) -> ChatFormat:
        return ChatFormat(self.base_dir)

    @property
    def writes(self) -> bool:
        """Whether this process writes the tuned model (saving, and the main rank)."""
        return self.save and self.ctx.is_main


@dataclass
class Training:
    """What one task trains: `model` (its trainable tensors are what the guard keeps), `items` with their
    `lengths` (for batching by length), `loss(net, batch) -> (summed loss, tokens)`, `weight(batch)` (what a
    step's loss is averaged over: trained tokens, pairs, examples), `evaluate() -> {"loss", ...}`, and
    `finish(guard)`, which saves the best state where the run writes. `facts` come first in the metrics,
    `scores(guard)` after training; `name` labels progress and checkpoints, `title` the curves."""

    model: nn.Module
    items: list
    lengths: list[int]
    loss: Callable[[nn.Module, list], tuple[torch.Tensor, int]]
    weight: Callable[[list], int]
    evaluate: Callable[[], dict]
    finish: Callable[[Validation], None]
    trainable: int
    name: str = "finetune"
    title: str = "fine-tuning"
    facts: dict[str, Any] = field(default_factory=dict)
    scores: Callable[[Validation], dict] = lambda guard: {}
    monitored: bool = False  # the run's in-training tasks ride along with validation
    extras: Callable[[], dict] | None = None  # the task's own figures for each log interval (GRPO's rewards)


def run_task(run: FinetuneRun, prepare: Callable[[FinetuneRun], Training]) -> dict:
    """Prepare the task's training, run the epochs under the overfitting guards, save, and report."""
    t = prepare(run)
    tasks = (lambda: run.monitor(t.model, run.tok, run.chat)) if t.monitored and run.monitor else None
    guard = Validation(t.model, t.evaluate, run.cfg, run.on_eval, tasks)
    plan = EpochPlan(t.items, t.lengths, t.loss, t.weight, t.name, run.recipe.seed, t.extras)
    figures = run_epochs(t.model, run.cfg, plan, guard, run.out, run.ctx, run.checkpoints)
    t.finish(guard)
    if run.writes:
        plot_curves(run.out / "metrics.jsonl", run.out / "loss.png", t.title)
    return {
        "method": run.cfg.method,
        **t.facts,
        "skipped_rows": len(run.splits["skipped"]),
        **t.scores(guard),
        **figures,
        **guard.summary(),
        "trainable_parameters": t.trainable,
    }


def save_best(run: FinetuneRun, model: nn.Module) -> Callable[[Validation], None]:
    """`finish` for a task whose model is a language model: the best weights as `final/` (and, for LoRA, the
    adapter), merged, in the base's format."""

    def finish(guard: Validation) -> None:
        if run.writes:
            save_tuned(model, guard, run.cfg, run.base_dir, run.tok, run.out, run.device)

    return finish
