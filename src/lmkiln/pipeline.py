"""A whole recipe: every stage checked before the first runs, then each in order (runs.py runs one),
then the run report."""

from __future__ import annotations

from types import ModuleType

from lmkiln.config import STAGES, Recipe
from lmkiln.log import console
from lmkiln.runs import rank, run_dir_made
from lmkiln.runs import run_stage as run_module


def stage_module(name: str) -> ModuleType:
    """The module that builds a stage (imported when needed: each pulls in its own libraries)."""
    if name == "data":
        from lmkiln.data import stage
    elif name == "tokenizer":
        from lmkiln.tokenizer import stage
    elif name == "pretrain":
        from lmkiln.train import pretrain as stage
    elif name == "import":
        from lmkiln.model.convert import stage
    elif name == "finetune":
        from lmkiln.train import finetune as stage
    elif name == "align":
        from lmkiln.train import align as stage
    elif name == "eval":
        from lmkiln.eval import stage
    else:
        raise ValueError(f"no stage '{name}' (stages: {', '.join(STAGES)})")
    return stage


def check_recipe(recipe: Recipe, stages: list[str]) -> None:
    """Cheap checks of everything a user could have mistyped, before any stage does work."""
    for name in stages:
        stage_module(name).check(recipe, stages)


def run_stage(name: str, recipe: Recipe, force: bool = False) -> dict:
    return run_module(name, stage_module(name), recipe, force)


def run_recipe(recipe: Recipe, force: bool = False, only: list[str] | None = None) -> dict[str, dict]:
    # with no stages named: every stage but those a recipe must ask for (import's source, align)
    stages = only or recipe.stages or [s for s in STAGES if s != "align" and (s != "import" or recipe.import_.source)]
    check_recipe(recipe, stages)
    with run_dir_made(recipe.run_dir):
        results = {name: run_stage(name, recipe, force=force) for name in stages}
    if only is None and rank()[0] == 0:
        from lmkiln.report import write_report

        path = write_report(recipe.run_dir, skip_if_current=not force)
        console.print(f"report: {path}")
    return results
