"""Training: the pretraining and fine-tuning stages and the parts they share."""

from __future__ import annotations

from pathlib import Path


def run_pretrain(recipe, run_dir: str | Path | None = None, force: bool = False) -> dict:
    """Run the pretrain stage of a recipe in its run directory (skipped when up to date); its manifest."""
    from lmkiln.runs import run_one
    from lmkiln.train import pretrain

    return run_one("pretrain", pretrain, recipe, run_dir, force)


def run_finetune(recipe, run_dir: str | Path | None = None, force: bool = False) -> dict:
    """Run the finetune stage of a recipe in its run directory (skipped when up to date); its manifest."""
    from lmkiln.runs import run_one
    from lmkiln.train import finetune

    return run_one("finetune", finetune, recipe, run_dir, force)
