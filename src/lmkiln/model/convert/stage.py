"""`kiln run`'s import stage: an open model (an HF directory, a GGUF file, a model an installed Python
package ships, or a hub id) into run_dir/import/final, checked, so a recipe can fine-tune and evaluate
it (`finetune.base: import`, `eval.models: [import, finetune]`) with the stage cache like any stage."""

from __future__ import annotations

from pathlib import Path

from lmkiln.config import Recipe
from lmkiln.errors import UserError
from lmkiln.io import sha256_file
from lmkiln.log import console
from lmkiln.runs import FINAL


def config_of(recipe: Recipe) -> dict:
    return recipe.import_.model_dump(mode="json")


def _source(recipe: Recipe) -> str:
    from lmkiln.model.convert.importer import package_source

    if recipe.import_.source is None:
        raise UserError("import.source: name the model to import (a directory, a .gguf file, package:NAME or a hub id)")
    return package_source(recipe.import_.source)


def check_source(recipe: Recipe) -> None:
    """The source is there (a path, a package's model) or has a hub id's shape, before any work."""
    source = _source(recipe)
    if not Path(source).exists() and source.count("/") != 1:
        raise UserError(
            f"import.source: '{recipe.import_.source}' is neither a model directory, a GGUF file, "
            f"package:NAME nor a Hugging Face hub id (OWNER/NAME)"
        )


def check(recipe: Recipe, will_run: list[str]) -> None:
    check_source(recipe)


def inputs_of(recipe: Recipe) -> dict:
    """The source's content: its GGUF file or weight files by hash (a hub id by name)."""
    from lmkiln.model.io.gguf_import import gguf_source
    from lmkiln.model.io.hub import weight_shards

    source = _source(recipe)
    gguf = gguf_source(source)
    if gguf is not None:
        return {"gguf": sha256_file(gguf)}
    if Path(source).is_dir():
        return {str(p.name): sha256_file(p) for p in weight_shards(Path(source))}
    return {"hub": source}


def build(recipe: Recipe, out: Path) -> dict:
    from lmkiln.model.convert.importer import describe, import_model
    from lmkiln.model.io.checks import print_checks

    # a recipe's import is fine-tuned and evaluated: a quantized GGUF comes in dense (fp32) for that
    checks = import_model(_source(recipe), out / FINAL, recipe.import_.dtype, keep_quantized=False)
    console.print(f"imported {recipe.import_.source}\n{describe(out / 'final')}\nchecks:")
    print_checks(checks)
    return {"source": recipe.import_.source, "checks": {c.name: c.status for c in checks}}
