"""`kiln eval`: score several models on the same held-out data and print one side-by-side table."""

from __future__ import annotations

from pathlib import Path

from lmkiln.config import STAGES, Recipe
from lmkiln.data.stage import read_split
from lmkiln.device import pick_device
from lmkiln.errors import UserError
from lmkiln.io import write_json, write_text
from lmkiln.log import console
from lmkiln.model.hub import load_model
from lmkiln.pipeline import stage_dir, upstream
from lmkiln.tokenizer.train import load_tokenizer
from lmkiln.train.finetune import model_dir_of, model_identity

COLUMNS = [  # (task, metric, label, higher is better)
    ("perplexity", "loss", "held-out loss", False),
    ("perplexity", "bits_per_byte", "bits/byte", False),
    ("docstrings", "reply_loss", "docstring loss", False),
    ("docstrings", "rouge_l", "docstring ROUGE-L", True),
]


def config_of(recipe: Recipe) -> dict:
    return {"eval": recipe.eval.model_dump(mode="json"), "heldout_fraction": recipe.data.val_fraction,
            "finetune_data": recipe.finetune.data, "finetune_max_seq_len": recipe.finetune.max_seq_len}


def inputs_of(recipe: Recipe, run_dir: Path) -> dict:
    ident = {m: model_identity(run_dir, m) for m in recipe.eval.models}
    if "perplexity" in recipe.eval.tasks and recipe.eval.text == "val":
        ident["text"] = upstream(run_dir, "data")
    return ident


def _texts(recipe: Recipe, run_dir: Path):
    if recipe.eval.text == "val":
        upstream(run_dir, "data")  # a clear error when there is no finished data stage to read
        return read_split(stage_dir(run_dir, "data"), "val")
    return iter([Path(recipe.eval.text).read_text(encoding="utf-8")])


def display_names(models: list[str]) -> dict[str, str]:
    """Stage names as they are; directories by their last two path parts (`finetune/final`) when unique."""
    short = {m: m if m in STAGES else "/".join(Path(m).resolve().parts[-2:]) for m in models}
    if len(set(short.values())) < len(models):
        short = {m: m if m in STAGES else str(Path(m)) for m in models}
    return short


def evaluate(recipe: Recipe, run_dir: Path, models: list[str]) -> dict:
    from lmkiln.eval.generative import score_instructions
    from lmkiln.eval.perplexity import perplexity, tokens_of
    from lmkiln.train.formats import ChatFormat, load_splits, sample

    cfg = recipe.eval
    device = pick_device(cfg.device)
    examples = None
    if "docstrings" in cfg.tasks:
        test = load_splits("builtin:python-docstrings", recipe.finetune.val_fraction, recipe.data.val_fraction)["test"]
        examples = sample(test, cfg.max_examples, salt="eval")
    results: dict = {}
    names = display_names(models)
    for ref in models:
        path = model_dir_of(run_dir, ref)
        if not (path / "config.json").is_file():
            raise UserError(f"eval.models: no model at '{path}'")
        name = names[ref]
        console.print(f"evaluating {name} ({path})")
        model, tok = load_model(path, device), load_tokenizer(path)
        res: dict = {"path": str(path)}
        if "perplexity" in cfg.tasks:
            tokens = tokens_of(tok, _texts(recipe, run_dir), cfg.max_tokens)
            if len(tokens) <= cfg.seq_len:
                raise UserError(f"eval.text: '{recipe.eval.text}' has {len(tokens)} tokens; perplexity needs more "
                                f"than eval.seq_len={cfg.seq_len}")
            res["perplexity"] = perplexity(model, tok, tokens, cfg.seq_len)
        if examples is not None:
            res["docstrings"] = score_instructions(model, tok, examples, cfg.max_new_tokens, recipe.finetune.max_seq_len,
                                                   ChatFormat(path))
        results[name] = res
    return results


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    cols = [c for c in COLUMNS if any(c[0] in r for r in results.values())]
    header = ["model"] + [f"{label} {'↑' if up else '↓'}" for _, _, label, up in cols]
    rows = []
    for name, r in results.items():
        rows.append([name] + [f"{r[task][metric]:.4f}" if task in r else "–" for task, metric, _, _ in cols])
    return header, rows


def markdown_table(results: dict) -> str:
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(results)
    table = Table(title="evaluation", show_edge=False)
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def write_results(results: dict, out: Path) -> None:
    write_json(out / "eval.json", results)
    write_text(out / "eval.md", "# Evaluation\n\n" + markdown_table(results))


def build(recipe: Recipe, run_dir: Path, out: Path) -> dict:
    results = evaluate(recipe, run_dir, recipe.eval.models)
    write_results(results, out)
    print_table(results)
    return {name: {task: {k: v for k, v in r[task].items() if k != "samples"}
                   for task in r if task != "path"} for name, r in results.items()}
