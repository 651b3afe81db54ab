"""The run directory, and how a stage runs in it.

A run directory holds a folder per stage (`data/`, `tokenizer/`, `pretrain/`, `import/`, `finetune/`,
`align/`, `eval/`); a stage that makes a model leaves it in `final/` and its resumable state in `checkpoints/`.

A stage is a module with four functions:
  `check(recipe, will_run) -> None`      cheap checks of its settings, before any stage works;
  `config_of(recipe) -> dict`            the settings its result depends on;
  `inputs_of(recipe) -> dict`            content hashes of what it reads;
  `build(recipe, out) -> dict`           does the work in `out`, returns its metrics.
The run directory is `recipe.run_dir`, its one source.
A stage whose manifest records the same config and inputs, and whose outputs are all there, is
skipped. The manifest is written last, so a killed stage is never taken as done.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path
from types import ModuleType

from lmkiln.config import STAGES, Recipe
from lmkiln.errors import UserError
from lmkiln.io import MANIFEST, Timer, package_versions, read_manifest, sha256_file, sha256_json, write_json
from lmkiln.log import console

FINAL = "final"  # the model a stage made
CHECKPOINTS = "checkpoints"  # its resumable state while it runs
DISTRIBUTED_STAGES = {"pretrain", "finetune", "align"}


def stage_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / name


def model_label(ref: str) -> tuple[str | None, str]:
    """`LABEL=DIR` is a model directory with the name tables give it (another run's model beside this
    run's); anything else has no label."""
    label, sep, path = ref.partition("=")
    if sep and path and re.fullmatch(r"[\w.@+-]+", label):
        return label, path
    return None, ref


def model_dir_of(run_dir: Path, ref: str) -> Path:
    """A stage name (its `final` model) or a model directory (`LABEL=DIR` too)."""
    ref = model_label(ref)[1]
    return stage_dir(run_dir, ref) / FINAL if ref in STAGES else Path(ref)


def model_identity(run_dir: Path, ref: str) -> dict:
    """What a stage that reads the model `ref` depends on: the stage's final outputs, or the file's hash."""
    ref = model_label(ref)[1]
    if ref in STAGES:
        return upstream(run_dir, ref, sub=FINAL)
    return {"path": str(Path(ref).resolve()), "weights": sha256_file(Path(ref) / "model.safetensors")}


def outputs_of(out: Path) -> dict[str, dict]:
    """Every file a stage left (but its manifest, scratch and checkpoints), with size and hash."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if (
            p.is_file()
            and p.name != MANIFEST
            and not any(part.startswith(".") for part in rel.parts)
            and rel.parts[0] != CHECKPOINTS
        ):
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
    if (
        manifest is None
        or manifest.get("config_hash") != sha256_json(config)
        or manifest.get("inputs_hash") != sha256_json(inputs)
    ):
        return None
    for rel, meta in manifest.get("outputs", {}).items():
        f = out / rel
        if not f.is_file() or f.stat().st_size != meta["bytes"]:
            return None
    return manifest


def rank() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_stage(name: str, stage: ModuleType, recipe: Recipe, force: bool = False) -> dict:
    """Run one stage module in its folder of the run directory, or skip it when its manifest is current."""
    out = stage_dir(recipe.run_dir, name)
    config = stage.config_of(recipe)
    inputs = stage.inputs_of(recipe)
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
        metrics = stage.build(recipe, out)
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
    for named in refs:
        ref = model_label(named)[1]
        path = model_dir_of(run_dir, ref)
        if (ref in STAGES and not finished) or (path / "config.json").is_file():
            continue
        if ref in STAGES:
            raise UserError(
                f"{key}: '{ref}' has no finished model in {run_dir} (no {path / 'config.json'}): "
                f"run `kiln {ref}` first or name a model directory"
            )
        why = "it does not exist" if not path.exists() else "no config.json"
        raise UserError(f"{key}: '{named}' is neither a stage name nor a model directory ({why})")


@contextlib.contextmanager
def run_dir_made(path: Path):
    """The run directory, made if needed, and removed again if a failed run left it empty."""
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if made and rank()[0] == 0 and not any(path.iterdir()):
            path.rmdir()
        raise


def run_one(
    name: str, stage: ModuleType, recipe: Recipe, run_dir: str | Path | None = None, force: bool = False
) -> dict:
    """A stage on its own, as `lmkiln.<stage>.run` and `kiln <stage>` run it: checked, then run."""
    if run_dir is not None:
        recipe = recipe.model_copy(update={"run_dir": Path(run_dir)})
    stage.check(recipe, [name])
    with run_dir_made(recipe.run_dir):
        return run_stage(name, stage, recipe, force=force)
