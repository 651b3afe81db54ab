"""Evaluation: perplexity and bits per byte, the docstring task, side-by-side comparison, the run report."""

from __future__ import annotations

from pathlib import Path


def run(recipe, run_dir: str | Path | None = None, force: bool = False) -> dict:
    """Run the eval stage of a recipe in its run directory (skipped when up to date); its manifest."""
    from lmkiln.eval import stage
    from lmkiln.runs import run_one

    return run_one("eval", stage, recipe, run_dir, force)
