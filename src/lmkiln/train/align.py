"""`kiln align`, the stage: a second fine-tuning on the supervised model, as post-training goes (SFT, then
DPO or GRPO), in its own folder (run_dir/align) so base, SFT-tuned and aligned models can be compared
side by side. It is the finetune stage (train/finetune.py) on the recipe's `align` section: the same
checks, splits, tasks, loop, checkpoints and resume; its messages name `align.` keys."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from lmkiln.config import Recipe
from lmkiln.errors import UserError
from lmkiln.train import finetune

_KEY = re.compile(r"\bfinetune\.(?=[a-z_])")


def as_finetune(recipe: Recipe) -> Recipe:
    """The recipe with its align section where the finetune stage reads its settings."""
    return recipe.model_copy(update={"finetune": recipe.align})


@contextlib.contextmanager
def _align_keys():
    """The finetune stage's messages name its keys; here the same keys are the align section's."""
    try:
        yield
    except UserError as exc:
        raise UserError(_KEY.sub("align.", str(exc))) from None


def check(recipe: Recipe, will_run: list[str]) -> None:
    with _align_keys():
        finetune.check(as_finetune(recipe), will_run)


def config_of(recipe: Recipe) -> dict:
    config = finetune.config_of(as_finetune(recipe))
    return {"align": config.pop("finetune"), **config}


def inputs_of(recipe: Recipe) -> dict:
    with _align_keys():
        return finetune.inputs_of(as_finetune(recipe))


def build(recipe: Recipe, out: Path) -> dict:
    with _align_keys():
        return finetune.build(as_finetune(recipe), out)
