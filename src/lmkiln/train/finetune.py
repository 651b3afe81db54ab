"""`kiln finetune`, the stage: its checks, the base model and the data splits, then one `FinetuneRun` through
`run_task` (train/finetune_run.py) with the task `finetune.task` names (train/tasks.py: SFT, DPO,
classification, tagging; text to text on an encoder-decoder base), all on the shared epochs
(train/epochs.py) with validation, early stopping and the best state kept."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from lmkiln.config import Recipe
from lmkiln.data.counterfactual import augment, pairs_fingerprint, read_pairs
from lmkiln.data.examples import check_source, encode_example, load_splits, preference_pair, sample
from lmkiln.data.gettext_pairs import PREFIX as GETTEXT
from lmkiln.data.gettext_pairs import catalogue_fingerprint
from lmkiln.device import seed_everything
from lmkiln.errors import UserError
from lmkiln.eval.during import TaskMonitor
from lmkiln.io import sha256_file, sha256_json
from lmkiln.log import console, set_quiet
from lmkiln.model.inference.load import load_format
from lmkiln.model.io.chat_format import ChatFormat
from lmkiln.model.io.hub import family_of_dir
from lmkiln.model.loss import IGNORE
from lmkiln.runs import CHECKPOINTS, check_models, model_dir_of, model_identity
from lmkiln.train import dist
from lmkiln.train.epochs import Checkpoints
from lmkiln.train.finetune_run import FinetuneRun, run_task
from lmkiln.train.tasks import TASKS


def check(recipe: Recipe, will_run: list[str]) -> None:
    """The data source and the base model (made by an earlier stage of this run, or there already), and
    every in-training task line."""
    cfg = recipe.finetune
    if cfg.task == "grpo":  # imported and their signatures checked before any model loads
        from lmkiln.eval.rewards import load_rewards

        load_rewards(cfg.rewards)
    check_source(cfg.data)
    check_models(recipe.run_dir, [cfg.base], "finetune.base", finished=cfg.base not in will_run)
    if cfg.eval_tasks:
        TaskMonitor(cfg.eval_tasks, recipe, cfg.eval_tasks_max_examples)
    if cfg.counterfactual.enabled:
        read_pairs(cfg.counterfactual.pairs)


def config_of(recipe: Recipe) -> dict:
    # how often the run saves its state is not what it computes
    cfg = recipe.finetune.model_dump(mode="json", exclude={"checkpoint_every", "keep_checkpoints"})
    if cfg["pooling"] == "cls":  # the default: runs from before the option stay current
        cfg.pop("pooling")
    if cfg["task"] != "grpo":  # only GRPO reads them: other runs from before them stay current
        cfg.pop("rewards")
        cfg.pop("grpo")
    if not cfg["templates"]:
        cfg.pop("templates")
    return {"finetune": cfg, "seed": recipe.seed, "heldout_fraction": recipe.data.val_fraction}


def inputs_of(recipe: Recipe) -> dict:
    data = recipe.finetune.data
    ident = {"base": model_identity(recipe.run_dir, recipe.finetune.base)}
    if data.startswith(GETTEXT):
        ident["data"] = catalogue_fingerprint(data)
    elif data.startswith("builtin:"):
        from lmkiln.data.builtin import stdlib_fingerprint

        ident["data"] = stdlib_fingerprint()
    elif Path(data).is_file():
        ident["data"] = sha256_file(data)
    if recipe.finetune.counterfactual.enabled:
        ident["counterfactual_pairs"] = pairs_fingerprint(recipe.finetune.counterfactual.pairs)
    if recipe.finetune.task == "grpo":
        from lmkiln.eval.rewards import rewards_fingerprint

        ident["rewards"] = rewards_fingerprint(recipe.finetune.rewards)
    return ident


def preview(recipe: Recipe, n: int) -> None:
    """Print n training examples as the model sees them, the tokens the loss trains on highlighted."""
    from rich.console import Console
    from rich.text import Text

    out = Console(highlight=False)  # a result: stdout, even with -q
    cfg = recipe.finetune
    base_dir = model_dir_of(recipe.run_dir, cfg.base)
    if not (base_dir / "config.json").is_file():
        raise UserError(
            f"finetune.base: no model at '{base_dir}' (run `kiln pretrain` first or name a model directory)"
        )
    tok, _ = load_format(base_dir)
    splits = finetune_splits(recipe)
    chat = ChatFormat(base_dir)
    for ex in splits["train"][:n]:
        pair = "chosen" in ex
        for name, part in zip(("chosen: ", "rejected: "), preference_pair(ex)) if pair else [("", ex)]:
            ids, labels = encode_example(tok, part, chat, cfg.loss_on, last_reply_only=pair)
            text = Text()
            for i, token in enumerate(ids):  # token i is trained when it is the label of position i - 1
                trained = i > 0 and labels[i - 1] != IGNORE
                text.append(tok.decode([token], skip_special_tokens=False), style="bold green" if trained else "dim")
            out.rule(
                f"{name}{Path(ex['id']).name}: {len(ids)} tokens, {sum(label != IGNORE for label in labels)} trained",
                style="dim",
            )
            out.print(text)
    out.print(
        f"[dim]shown {min(n, len(splits['train']))} of {len(splits['train']):,} training examples; "
        f"[bold green]trained tokens[/bold green] in green[/dim]"
    )


def finetune_splits(recipe: Recipe) -> dict[str, list]:
    cfg = recipe.finetune
    return load_splits(
        cfg.data, cfg.val_fraction, recipe.data.val_fraction, cfg.format, cfg.columns, cfg.on_bad_rows, cfg.templates
    )


def check_base(base_dir: Path) -> None:
    """The train/serve consistency checks on the base model, before any training: a chat template
    that does not render stops the run; the rest is reported."""
    from lmkiln.model.io.checks import consistency_checks, print_checks

    checks = consistency_checks(base_dir)
    console.print(f"base model checks ({base_dir}):")
    print_checks(checks)
    failed = [c for c in checks if c.status == "failed" and c.name == "chat template"]
    if failed:
        raise UserError(f"finetune.base: {base_dir}: chat template {failed[0].detail}")


def kind_of(ex: dict) -> str:
    if "tags" in ex:
        return "tagging"
    if "chosen" in ex:
        return "preference"
    if "label" in ex:
        return "classification"
    return "text" if "text" in ex else "chat"


def check_task(examples: list[dict], task: str) -> None:
    """Every example must suit the task: a preference pair cannot train a plain language model."""
    allowed = TASKS[task].formats
    for ex in examples:
        kind = kind_of(ex)
        if kind not in allowed:
            raise UserError(
                f"finetune.data: {ex['id']} is a {kind} example; finetune.task={task} takes "
                f"{' or '.join(allowed)} rows (set finetune.task or finetune.format)"
            )


def check_splits(splits: dict, cfg) -> None:
    """Both sides of the split have rows: validation picks the kept step and stops early."""
    n = len(splits["train"]) + len(splits["val"])
    if not splits["train"]:
        raise UserError(
            f"finetune.data: the training split of {cfg.data} is empty ({n} rows, "
            f"{len(splits['val'])} held out for validation); add rows or give them split: train"
        )
    if not splits["val"]:
        raise UserError(
            f"finetune.data: the validation split of {cfg.data} is empty ({len(splits['train'])} rows, "
            f"none drawn at finetune.val_fraction={cfg.val_fraction} by row content); add rows, raise "
            f"finetune.val_fraction, or mark some rows with split: val"
        )


def load_base(recipe: Recipe):
    """The base model's directory, tokenizer and data splits, checked before any training."""
    cfg = recipe.finetune
    base_dir = model_dir_of(recipe.run_dir, cfg.base)
    if not (base_dir / "config.json").is_file():
        raise UserError(
            f"finetune.base: no model at '{base_dir}' (run `kiln pretrain` first or name a model directory)"
        )
    seed_everything(recipe.seed)
    tok, _ = load_format(base_dir)
    check_base(base_dir)
    splits = finetune_splits(recipe)
    check_splits(splits, cfg)
    check_task(splits["train"] + splits["val"], cfg.task)
    if cfg.max_examples:
        splits["train"] = sample(splits["train"], cfg.max_examples)
    if cfg.counterfactual.enabled:  # the training rows only: validation measures the data as it comes
        c = cfg.counterfactual
        splits["train"], splits["counterfactual"] = augment(splits["train"], c.mode, c.rate, c.pairs)
        stats = splits["counterfactual"]
        top = ", ".join(f"{k} {v}" for k, v in list(stats["swaps"].items())[:6])
        console.print(
            f"counterfactual ({c.mode}): {stats['rows_changed']:,} of {stats['rows_in']:,} training rows swapped, "
            f"{stats['rows_out']:,} rows now; {top}"
        )
    return base_dir, tok, splits


def build(recipe: Recipe, out: Path, on_eval: Callable[[int, float], None] | None = None, save: bool = True) -> dict:
    """Fine-tune as the recipe says; `on_eval` hears each validation loss, `save=False` keeps only metrics.
    Under torchrun, DDP over the ranks (train/loop.py)."""
    ctx = dist.setup(recipe.finetune.device)
    quiet = console.quiet
    if not ctx.is_main:
        set_quiet(True)
    try:
        cfg = recipe.finetune
        base_dir, tok, splits = load_base(recipe)
        plan = (
            Checkpoints(
                out / CHECKPOINTS,
                sha256_json([config_of(recipe), inputs_of(recipe)]),
                cfg.checkpoint_every,
                cfg.keep_checkpoints,
            )
            if save
            else None
        )
        prepare = TASKS[cfg.task].prepare_for(family_of_dir(base_dir), cfg.task)
        monitor = TaskMonitor(cfg.eval_tasks, recipe, cfg.eval_tasks_max_examples) if cfg.eval_tasks else None
        run = FinetuneRun(recipe, base_dir, splits, tok, out, ctx, on_eval, save, monitor, plan)
        result = run_task(run, prepare)
        if plan is not None and ctx.is_main:  # finished and saved: nothing left to resume
            shutil.rmtree(plan.dir, ignore_errors=True)
        if "counterfactual" in splits:
            result["counterfactual"] = splits["counterfactual"]
        return result
    finally:
        dist.teardown(ctx)
        set_quiet(quiet)
