"""Data preparation: gather, clean, filter, deduplicate and shard text."""

from __future__ import annotations

from pathlib import Path


def run(recipe, run_dir: str | Path | None = None, force: bool = False) -> dict:
    """Run the data stage of a recipe in its run directory (skipped when up to date); its manifest."""
    from lmkiln.data import stage
    from lmkiln.runs import run_one

    return run_one("data", stage, recipe, run_dir, force)
