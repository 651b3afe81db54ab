"""Tokenizer: byte-level BPE (HF `tokenizers`), chat templates, and encoding into token shards."""

from __future__ import annotations

from pathlib import Path


def run(recipe, run_dir: str | Path | None = None, force: bool = False) -> dict:
    """Run the tokenizer stage of a recipe in its run directory (skipped when up to date); its manifest."""
    from lmkiln.runs import run_one
    from lmkiln.tokenizer import stage

    return run_one("tokenizer", stage, recipe, run_dir, force)
