"""Runs stages: run directory, manifests, caching, --force, and a whole recipe in order.

A stage is a module with three functions:
  `config_of(recipe) -> dict`            the settings its result depends on;
  `inputs_of(recipe, run_dir) -> dict`   content hashes of what it reads;
  `build(recipe, run_dir, out) -> dict`  does the work in `out`, returns its metrics.
A stage whose manifest records the same config and inputs, and whose outputs are all there, is
skipped. The manifest is written last, so a killed stage is never taken as done.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import time
from pathlib import Path

from lmkiln.config import STAGES, Recipe
from lmkiln.errors import UserError
from lmkiln.io import MANIFEST, Timer, package_versions, read_manifest, sha256_json, write_json
from lmkiln.log import console

STAGE_MODULES = {
    "data": "lmkiln.data.stage",
    "tokenizer": "lmkiln.tokenizer.stage",
    "pretrain": "lmkiln.train.pretrain",
    "import": "lmkiln.model.stage",
    "finetune": "lmkiln.train.finetune",
    "eval": "lmkiln.eval.stage",
}


def stage_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / name


def outputs_of(out: Path) -> dict[str, dict]:
    """Every file a stage left (but its manifest and scratch), with size and hash."""
    from lmkiln.io import sha256_file

    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if p.is_file() and p.name != MANIFEST and not any(part.startswith(".") for part in rel.parts) \
                and rel.parts[0] != "checkpoints":
            files[str(rel)] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return files


def upstream(run_dir: Path, name: str, sub: str | None = None) -> dict:
    """The identity of a finished upstream stage's outputs (optionally those under `sub`)."""
    manifest = read_manifest(stage_dir(run_dir, name))
    if manifest is None:
        raise UserError(f"stage '{name}' has not finished in {run_dir}: run `kiln {name}` (or `kiln run`) first")
    outs = manifest["outputs"]
    if sub is not None:
        outs = {k: v for k, v in outs.items() if k.startswith(sub + "/")}
    return {"stage": name, "outputs": sha256_json(outs)}


def is_fresh(out: Path, config: dict, inputs: dict) -> dict | None:
    manifest = read_manifest(out)
    if manifest is None or manifest.get("config_hash") != sha256_json(config) \
            or manifest.get("inputs_hash") != sha256_json(inputs):
        return None
    for rel, meta in manifest.get("outputs", {}).items():
        f = out / rel
        if not f.is_file() or f.stat().st_size != meta["bytes"]:
            return None
    return manifest


DISTRIBUTED_STAGES = {"pretrain", "finetune"}


def rank() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_stage(name: str, recipe: Recipe, force: bool = False) -> dict:
    module = importlib.import_module(STAGE_MODULES[name])
    run_dir = Path(recipe.run_dir)
    out = stage_dir(run_dir, name)
    config = module.config_of(recipe)
    inputs = module.inputs_of(recipe, run_dir)
    if not force:
        manifest = is_fresh(out, config, inputs)
        if manifest is not None:
            console.print(f"[dim]{name}: up to date, skipped ({out / MANIFEST})[/dim]")
            manifest["skipped"] = True
            return manifest
    my_rank, world = rank()
    if world > 1 and name not in DISTRIBUTED_STAGES:
        raise UserError(f"stage '{name}' runs in one process: run `kiln {name}` without torchrun first")
    existed = out.exists() and not force
    if my_rank == 0:  # under torchrun, rank 0 alone touches the stage folder; the others only read
        if force and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
    console.rule(f"[bold]{name}")
    timer = Timer()
    try:
        metrics = module.build(recipe, run_dir, out)
    except Exception as exc:
        if my_rank == 0:
            _clear_failed(out, created=not existed, refused=isinstance(exc, UserError))
        raise
    if my_rank != 0:
        return {"stage": name, "metrics": metrics, "rank": my_rank}
    manifest = {
        "stage": name,
        "config": config,
        "config_hash": sha256_json(config),
        "inputs": inputs,
        "inputs_hash": sha256_json(inputs),
        "seed": recipe.seed,
        "versions": package_versions(),
        "wall_time_s": timer.seconds,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metrics": metrics,
        "outputs": outputs_of(out),
    }
    write_json(out / MANIFEST, manifest)
    console.print(f"{name}: done in {timer.seconds:.1f}s -> {out}")
    return manifest


def _clear_failed(out: Path, created: bool, refused: bool) -> None:
    """A failed stage leaves no empty folder behind, nor a folder it made for a run that was refused
    (a UserError); one holding checkpoints stays, for the next run to resume from."""
    empty = not any(p.is_file() for p in out.rglob("*"))
    if empty or (created and refused and not (out / "checkpoints").is_dir()):
        shutil.rmtree(out, ignore_errors=True)


def check_models(run_dir: Path, refs: list[str], key: str, finished: bool = False) -> None:
    """Each model a verb will read: a model directory, or a stage name, whose final model must already
    be there when `finished` (no stage of this run will make it)."""
    for ref in refs:
        path = stage_dir(run_dir, ref) / "final" if ref in STAGES else Path(ref)
        if (ref in STAGES and not finished) or (path / "config.json").is_file():
            continue
        if ref in STAGES:
            raise UserError(f"{key}: '{ref}' has no finished model in {run_dir} (no {path / 'config.json'}): "
                            f"run `kiln {ref}` first or name a model directory")
        why = "it does not exist" if not path.exists() else "no config.json"
        raise UserError(f"{key}: '{ref}' is neither a stage name nor a model directory ({why})")


def check_recipe(recipe: Recipe, stages: list[str]) -> None:
    """Cheap checks of everything a user could have mistyped, before any stage does work."""
    from lmkiln.data.sources import check

    if "data" in stages:
        check(recipe.data.sources, recipe.data.on_error)
        for name in recipe.data.decontam.eval_files:
            if not Path(name).is_file():
                raise UserError(f"data.decontam.eval_files: '{name}' does not exist")
    if "import" in stages:
        from lmkiln.model.stage import check_source as check_import

        check_import(recipe)
    if "finetune" in stages:
        from lmkiln.train.formats import check_source

        check_source(recipe.finetune.data)
        check_models(Path(recipe.run_dir), [recipe.finetune.base], "finetune.base",
                     finished=recipe.finetune.base not in stages)
    for stage in ("pretrain", "finetune"):
        tasks = getattr(recipe, stage).eval_tasks
        if stage in stages and tasks:  # every task line read now, not at the first validation
            from lmkiln.eval.during import TaskMonitor

            TaskMonitor(tasks, recipe, getattr(recipe, stage).eval_tasks_max_examples)
    if "eval" in stages:
        from lmkiln.eval.stage import check_task_refs

        check_task_refs(recipe.eval)
        will_run = [s for s in stages if s != "eval"]
        for model in recipe.eval.models:
            check_models(Path(recipe.run_dir), [model], "eval.models", finished=model not in will_run)
        if recipe.eval.text != "val" and not Path(recipe.eval.text).is_file():
            raise UserError(f"eval.text: '{recipe.eval.text}' does not exist (expected 'val' or a text file)")
        if "perplexity" in recipe.eval.tasks and recipe.eval.text == "val" and "data" not in will_run:
            upstream(Path(recipe.run_dir), "data")  # the held-out text perplexity reads


@contextlib.contextmanager
def _run_dir(path: Path):
    """The run directory, made if needed, and removed again if a failed run left it empty."""
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if made and rank()[0] == 0 and not any(path.iterdir()):
            path.rmdir()
        raise


def run_recipe(recipe: Recipe, force: bool = False, only: list[str] | None = None) -> dict[str, dict]:
    stages = only or recipe.stages or [s for s in STAGES if s != "import" or recipe.import_.source]
    check_recipe(recipe, stages)
    with _run_dir(Path(recipe.run_dir)):
        results = {name: run_stage(name, recipe, force=force) for name in stages}
    if only is None and rank()[0] == 0:
        from lmkiln.eval.report import write_report

        path = write_report(Path(recipe.run_dir), skip_if_current=not force)
        console.print(f"report: {path}")
    return results


def stage_runner(name: str):
    """`lmkiln.<stage>.run(cfg, run_dir=None, force=False) -> manifest`, the stage as a function."""

    def run(cfg: Recipe, run_dir: str | Path | None = None, force: bool = False) -> dict:
        if run_dir is not None:
            cfg = cfg.model_copy(update={"run_dir": Path(run_dir)})
        check_recipe(cfg, [name])
        with _run_dir(Path(cfg.run_dir)):
            return run_stage(name, cfg, force=force)

    run.__name__ = "run"
    run.__doc__ = f"Run the {name} stage of a recipe in its run directory (skipped when up to date)."
    return run
