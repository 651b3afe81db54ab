"""`kiln eval`: score several models on the same held-out data and print one side-by-side table."""

from __future__ import annotations

from pathlib import Path

from lmkiln.config import STAGES, Recipe
from lmkiln.data.stage import read_split
from lmkiln.device import pick_device
from lmkiln.errors import UserError
from lmkiln.eval.results import print_table, write_results
from lmkiln.io import hash_tree, read_json, read_text, sha256_file, sha256_json
from lmkiln.log import console
from lmkiln.model.families import is_encoder_config, is_seq2seq_config
from lmkiln.model.inference.load import load_for_inference
from lmkiln.runs import check_models, model_dir_of, model_identity, model_label, stage_dir, upstream


def config_of(recipe: Recipe) -> dict:
    cfg = recipe.eval.model_dump(mode="json")
    for key, unset in (("templates", None), ("rewards", [])):  # runs from before the options stay current
        if cfg[key] == unset:
            cfg.pop(key)
    config = {
        "eval": cfg,
        "heldout_fraction": recipe.data.val_fraction,
        "finetune_data": recipe.finetune.data,
        "finetune_max_seq_len": recipe.finetune.max_seq_len,
        "finetune_val_fraction": recipe.finetune.val_fraction,
        "finetune_columns": recipe.finetune.columns,
    }
    if recipe.finetune.templates:
        config["finetune_templates"] = recipe.finetune.templates
    return config


def icl_tasks(cfg) -> list:
    """The ICL tasks of eval.tasks: each .jsonl file with eval's settings, each suite's entries with theirs."""
    from lmkiln.config import read_yaml
    from lmkiln.eval.icl import AXES_PREFIX, BUILTIN, KINDS, IclTask, task_path

    tasks = []
    for ref in cfg.tasks:
        if ref.startswith("gen:"):
            continue
        if ref.endswith(".jsonl") or ref in BUILTIN or ref.startswith(AXES_PREFIX):
            tasks.append(
                IclTask(
                    ref.split(":")[1] if ref in BUILTIN else task_path(ref).stem,
                    ref,
                    None,
                    cfg.shots,
                    cfg.delimiter,
                    cfg.separator,
                    cfg.icl_max_examples,
                )
            )
        elif ref.endswith((".yaml", ".yml")):
            suite = read_yaml(Path(ref)).get("tasks")
            if not isinstance(suite, list):
                raise UserError(f"{ref}: a suite is a mapping with 'tasks': a list of {{path, name?, kind?, shots?}}")
            for i, entry in enumerate(suite):
                allowed = {"name", "path", "kind", "shots", "delimiter", "separator", "max_examples"}
                if (
                    not isinstance(entry, dict)
                    or "path" not in entry
                    or set(entry) - allowed
                    or entry.get("kind") not in (None, *KINDS)
                ):
                    raise UserError(
                        f"{ref}: tasks[{i}]: expected {{path, name?, kind?: {'|'.join(KINDS)}, "
                        f"shots?, delimiter?, separator?, max_examples?}}, got {entry!r}"
                    )
                path = Path(ref).parent / entry["path"]
                tasks.append(
                    IclTask(
                        entry.get("name", path.stem),
                        str(path),
                        entry.get("kind"),
                        entry.get("shots", cfg.shots),
                        entry.get("delimiter", cfg.delimiter),
                        entry.get("separator", cfg.separator),
                        entry.get("max_examples", cfg.icl_max_examples),
                    )
                )
    return tasks


def gen_ref(ref: str) -> tuple[str, str]:
    """`gen:FILE[@SPLIT]` -> (file, split), both checked."""
    path, _, split = ref[len("gen:") :].partition("@")
    if split not in ("", "train", "val", "test"):
        raise UserError(f"eval.tasks: '{ref}': the split after @ must be train, val or test")
    if path.startswith("builtin:"):
        from lmkiln.data.examples import check_source

        check_source(path)
    elif not Path(path).is_file():
        raise UserError(f"eval.tasks: '{ref}': '{path}' does not exist (expected a data file)")
    return path, split


def check_task_refs(cfg) -> None:
    """Every task named exists, before any model loads: gen: files and splits, ICL files, suites."""
    for ref in cfg.tasks:
        if ref.startswith("gen:"):
            gen_ref(ref)
    from lmkiln.eval.icl import AXES_PREFIX, BUILTIN, load_docs

    for task in icl_tasks(cfg):
        if task.path.startswith(AXES_PREFIX):
            load_docs(task.path)  # the axis files, each checked
        elif task.path not in BUILTIN and not Path(task.path).is_file():
            raise UserError(f"eval.tasks: task file '{task.path}' does not exist")


def generative_tasks(recipe: Recipe) -> dict[str, list[dict]]:
    """`gen:FILE[@SPLIT]` tasks: eval.max_examples rows of a data file in any fine-tuning format
    (instruction, chat: generate the last reply; classification: score each label, or an encoder's
    classifier; tagging: an encoder's tagger), checked row by row.
    `@val`/`@test` keeps the rows fine-tuning holds out of that file, so base and tuned models are
    compared on rows neither trained on."""
    from lmkiln.data.examples import load_splits, sample

    cfg = recipe.eval
    columns = cfg.columns or recipe.finetune.columns
    if cfg.group_by:
        columns = {**columns, "group": cfg.group_by}
    out = {}
    for ref in cfg.tasks:
        if not ref.startswith("gen:"):
            continue
        path, split = gen_ref(ref)
        templates = recipe.finetune.templates if cfg.templates is None else cfg.templates
        splits = load_splits(
            path, recipe.finetune.val_fraction, recipe.data.val_fraction, "auto", columns, templates=templates
        )
        rows = splits[split] if split else splits["train"] + splits["val"] + splits["test"]
        rows = sample(rows, cfg.max_examples, salt="eval")
        if any("chosen" in r or ("text" in r and "label" not in r) for r in rows):
            raise UserError(f"{ref}: gen: tasks take instruction, chat, classification or tagging rows")
        if len({"label" if "label" in r else "tags" if "tags" in r else "reply" for r in rows}) > 1:
            raise UserError(f"{ref}: mixes kinds of rows (classification, tagging, instruction or chat)")
        if rows:
            out[Path(path).stem + (f"@{split}" if split else "")] = rows
    return out


def eval_rewards(cfg) -> list:
    """eval.rewards, imported and checked (none: [])."""
    if not cfg.rewards:
        return []
    from lmkiln.eval.rewards import load_rewards

    return load_rewards(cfg.rewards, "eval.rewards")


def check(recipe: Recipe, will_run: list[str]) -> None:
    """Every task reference and every model to score (made by an earlier stage of this run, or there)."""
    check_task_refs(recipe.eval)
    eval_rewards(recipe.eval)
    earlier = [s for s in will_run if s != "eval"]
    for model in recipe.eval.models:
        finished = model_label(model)[1] not in earlier
        check_models(recipe.run_dir, [model], "eval.models", finished=finished)
    if recipe.eval.text != "val" and not Path(recipe.eval.text).is_file():
        raise UserError(f"eval.text: '{recipe.eval.text}' does not exist (expected 'val' or a text file)")
    if "perplexity" in recipe.eval.tasks and recipe.eval.text == "val" and "data" not in earlier:
        upstream(recipe.run_dir, "data")  # the held-out text perplexity reads


def inputs_of(recipe: Recipe) -> dict:
    ident = {m: model_identity(recipe.run_dir, m) for m in recipe.eval.models}
    from lmkiln.eval.icl import task_path

    for task in icl_tasks(recipe.eval):
        path = task_path(task.path)
        if path.is_dir():  # builtin:bias or bias:DIR: its axis files
            ident[f"icl:{task.name}"] = sha256_json(hash_tree(path))
        else:
            ident[f"icl:{task.name}"] = sha256_file(path) if path.is_file() else task.path
    for ref in recipe.eval.tasks:
        gen_path = ref[len("gen:") :].partition("@")[0]
        if ref.startswith("gen:") and Path(gen_path).is_file():
            ident[ref] = sha256_file(gen_path)
        elif ref.startswith("gen:builtin:gettext-"):
            from lmkiln.data.gettext_pairs import catalogue_fingerprint

            ident[ref] = catalogue_fingerprint(gen_path)
    if "perplexity" in recipe.eval.tasks and recipe.eval.text == "val":
        ident["text"] = upstream(recipe.run_dir, "data")
    if recipe.eval.rewards:
        from lmkiln.eval.rewards import rewards_fingerprint

        ident["rewards"] = rewards_fingerprint(recipe.eval.rewards)
    return ident


def _texts(recipe: Recipe):
    if recipe.eval.text == "val":
        upstream(recipe.run_dir, "data")  # a clear error when there is no finished data stage to read
        return read_split(stage_dir(recipe.run_dir, "data"), "val")
    return iter([read_text(recipe.eval.text)])


def display_names(models: list[str]) -> dict[str, str]:
    """Stage names as they are; `LABEL=DIR` by its label; other directories by their last two path parts
    (`finetune/final`) when unique, else whole."""
    short = {m: m if m in STAGES else "/".join(Path(m).resolve().parts[-2:]) for m in models}
    if len(set(short.values())) < len(models):
        short = {m: m if m in STAGES else str(Path(m)) for m in models}
    labelled = {m: model_label(m)[0] or short[m] for m in models}
    if len(set(labelled.values())) < len(models):
        raise UserError(f"eval.models: two models would share a name in the table: {', '.join(models)}")
    return labelled


def evaluate(recipe: Recipe, models: list[str]) -> dict:
    from lmkiln.data.examples import load_splits, sample
    from lmkiln.eval.icl import load_docs

    cfg = recipe.eval
    device = pick_device(cfg.device)
    tasks = icl_tasks(cfg)
    loaded = [load_docs(task.path, task.kind) for task in tasks]  # every file checked before any model loads
    generative = generative_tasks(recipe)
    examples = None
    if "docstrings" in cfg.tasks:
        test = load_splits("builtin:python-docstrings", recipe.finetune.val_fraction, recipe.data.val_fraction)["test"]
        examples = sample(test, cfg.max_examples, salt="eval")
    results: dict = {}
    names = display_names(models)
    for ref in models:
        path = model_dir_of(recipe.run_dir, ref)
        if not (path / "config.json").is_file():
            raise UserError(f"eval.models: no model at '{path}'")
        name = names[ref]
        console.print(f"evaluating {name} ({path})")
        config = read_json(path / "config.json")
        if is_encoder_config(config):
            results[name] = _encoder_scores(recipe, path, name, generative, device)
        elif is_seq2seq_config(config):
            from lmkiln.eval.seq2seq import evaluate_seq2seq

            results[name] = evaluate_seq2seq(path, name, recipe, generative, examples, device)
        else:
            lm = load_for_inference(path, device)
            scores = _decoder_scores(recipe, lm, name, list(zip(tasks, loaded)), generative, examples)
            results[name] = {"path": str(path), **scores}
    if cfg.group_by:
        add_group_scores(results, generative, cfg)
    return results


def _decoder_scores(recipe: Recipe, lm, name: str, tasks: list, generative: dict, examples) -> dict:
    """A decoder's scores on every task: perplexity, docstrings, ICL tasks and bias probes, gen: rows."""
    from lmkiln.eval.bias_report import axis_line
    from lmkiln.eval.generative import score_instructions, score_labels
    from lmkiln.eval.icl import core_average, evaluate_task
    from lmkiln.eval.perplexity import perplexity, tokens_of

    cfg = recipe.eval
    model, tok, chat = lm.model, lm.tok, lm.chat
    rewards = eval_rewards(cfg)
    res: dict = {}
    if "perplexity" in cfg.tasks:
        tokens = tokens_of(tok, chat, _texts(recipe), cfg.max_tokens)
        if len(tokens) <= cfg.seq_len:
            raise UserError(
                f"eval.text: '{recipe.eval.text}' has {len(tokens)} tokens; perplexity needs more "
                f"than eval.seq_len={cfg.seq_len}"
            )
        res["perplexity"] = perplexity(model, tok, tokens, cfg.seq_len, stride=cfg.stride)
    if examples is not None:
        res["docstrings"] = score_instructions(
            model, tok, examples, cfg.max_new_tokens, recipe.finetune.max_seq_len, chat
        )
    for task, docs in tasks:
        res[task.name] = evaluate_task(model, tok, chat, task, cfg.seed, cfg.add_bos, loaded=docs)
        for a in res[task.name].get("axes", []):  # bias probes: each axis in plain words
            console.print(axis_line(f"{name} {task.name}", a))
    for task_name, rows in generative.items():
        if "tags" in rows[0]:
            console.print(f"{name}: tagging rows ({task_name}) are scored on an encoder's tagger; none for a decoder")
        elif "label" in rows[0]:
            res[task_name] = score_labels(model, tok, chat, rows, cfg.delimiter, cfg.add_bos)
        else:
            res[task_name] = score_instructions(
                model, tok, rows, cfg.max_new_tokens, recipe.finetune.max_seq_len, chat, cfg.metrics, rewards
            )
    core = core_average({t.name: res[t.name] for t, _ in tasks})
    if core is not None:
        res["icl"] = {"centered": core}
    return res


def add_group_scores(results: dict, generative: dict, cfg) -> None:
    """Each gen: task's scores per group of eval.group_by (eval/groups.py), beside its overall scores."""
    from lmkiln.eval.groups import classifier_groups, metric_groups

    for name, res in results.items():
        for task, rows in generative.items():
            r = res.get(task)
            if not isinstance(r, dict):
                continue
            groups = [row["group"] for row in rows]
            if "predicted" in r:
                try:
                    gold = [row["label"] for row in rows]
                    found = classifier_groups(groups, r["predicted"], gold, cfg.positive_label, cfg.min_group_rows)
                except ValueError as exc:
                    raise UserError(str(exc)) from None
            elif "samples" in r:
                per_row = {m: [s[m] for s in r["samples"]] for m in ("exact_match", "token_f1", "rouge_l")}
                found = metric_groups(groups, per_row, cfg.min_group_rows)
            else:
                continue
            r["by_group"] = {"column": cfg.group_by, **found}
            gaps = ", ".join(f"{m} {v:.4f}" for m, v in found["gaps"].items())
            fair = (
                f"; demographic parity difference {found['demographic_parity_difference']:.4f}, equalized odds "
                f"difference {found['equalized_odds_difference']:.4f}"
                if "demographic_parity_difference" in found
                else ""
            )
            console.print(
                f"{name} {task}: {len(found['groups'])} groups of {cfg.group_by} ({found['compared_groups']} with "
                f"{cfg.min_group_rows}+ rows): largest gaps {gaps}{fair}"
            )


def _encoder_scores(recipe: Recipe, path: Path, name: str, generative: dict, device) -> dict:
    from lmkiln.eval.encoders import evaluate_encoder

    try:
        return evaluate_encoder(path, name, recipe, lambda: _texts(recipe), generative, device)
    except ValueError as exc:
        raise UserError(f"{name} ({path}): {exc}") from None


def build(recipe: Recipe, out: Path) -> dict:
    results = evaluate(recipe, recipe.eval.models)
    write_results(results, out)
    print_table(results)
    return {
        name: {
            task: {k: v for k, v in r[task].items() if k not in ("samples", "correct", "predicted")}
            for task in r
            if task != "path"
        }
        for name, r in results.items()
    }


def compare(recipe: Recipe, models: list[str], out: Path | None = None, force: bool = False) -> dict:
    """`kiln eval --models`: score the models side by side outside the stage cache, print the table and,
    with `out`, write eval.json, eval.md and eval.png there. Every model and task is checked first."""
    from lmkiln.io import check_output_dir, output_dir

    recipe.eval.models = models
    check(recipe, ["eval"])
    if out:
        check_output_dir(out, [model_dir_of(recipe.run_dir, m) for m in models], force, "--out")
    results = evaluate(recipe, models)
    print_table(results)
    if out:
        with output_dir(out, "kiln eval") as tmp:
            write_results(results, tmp)
    return results
