"""`kiln tune RECIPE --trials N`: search fine-tuning settings with Optuna (TPE sampler, median pruner).

Each trial fine-tunes with the recipe plus the trial's settings and is scored by its best validation
loss; every evaluation is reported to the pruner, which stops a trial whose loss is worse than the
median of earlier trials at the same evaluation. Trials run one after another in this process and
are stored in run_dir/tune/study.db, so an interrupted search resumes where it stopped. Written:
best.yaml (the recipe with the best settings, runnable as it is), trials.csv and trials.png.

The search space is `tune.space` (finetune keys -> {low, high, log} or a list of choices), by
default the learning rate, the epochs and, with LoRA, the rank. When the rank is searched and alpha
is not, alpha follows the rank so that alpha / r, the adapter's scale, stays as the recipe set it.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import yaml

from lmkiln.config import Range, Recipe
from lmkiln.errors import UserError
from lmkiln.io import write_text
from lmkiln.log import console


def default_space(recipe: Recipe) -> dict:
    cfg = recipe.finetune
    space: dict = {
        "lr": Range(low=cfg.lr / 10, high=cfg.lr * 3, log=True),
        "epochs": Range(low=1, high=max(2, 2 * cfg.epochs)),
    }
    if cfg.method == "lora":
        space["lora.r"] = [4, 8, 16, 32]
    return space


def _current(recipe: Recipe, key: str):
    node = recipe.finetune
    for part in key.split("."):
        if not hasattr(node, "model_fields") or part not in node.model_fields:
            raise UserError(f"tune.space: '{key}' is not a finetune key (e.g. lr, epochs, lora.r, batch_size)")
        node = getattr(node, part)
    return node


def suggest(trial, recipe: Recipe, space: dict) -> dict:
    """The trial's settings: ints where the recipe's value is an int, log scale where asked."""
    params = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            params[key] = trial.suggest_categorical(key, spec)
        elif isinstance(_current(recipe, key), int) and not isinstance(_current(recipe, key), bool):
            params[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
        else:
            params[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
    return params


def with_params(recipe: Recipe, params: dict) -> Recipe:
    """The recipe with finetune settings replaced, checked as any recipe is."""
    tree = recipe.model_dump(mode="json")
    for key, value in params.items():
        node = tree["finetune"]
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    if "lora.r" in params and "lora.alpha" not in params:
        cfg = recipe.finetune.lora
        tree["finetune"]["lora"]["alpha"] = params["lora.r"] * cfg.alpha / cfg.r
    try:
        return Recipe.model_validate(tree)
    except ValueError as exc:
        raise UserError(f"tune: settings {params} make an invalid recipe: {exc}") from None


def tune(recipe: Recipe, trials: int | None = None) -> dict:
    if trials is not None and trials < 1:
        raise UserError(f"--trials must be 1 or more, got {trials}")
    try:
        import optuna
    except ImportError:
        raise UserError("kiln tune needs Optuna: pip install 'lmkiln[tune]'") from None
    from lmkiln.train.finetune import check

    space = recipe.tune.space or default_space(recipe)
    for key in space:
        _current(recipe, key)
    check(recipe, ["finetune"])
    out = recipe.run_dir / "tune"
    out.mkdir(parents=True, exist_ok=True)
    trials = trials or recipe.tune.trials
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="tune",
        storage=f"sqlite:///{out / 'study.db'}",
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=recipe.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=recipe.tune.pruner_warmup + 1),
    )
    done = len([t for t in study.trials if t.state.is_finished()])
    console.print(
        f"tune: {trials} trials over {', '.join(space)}" + (f" ({done} already in {out / 'study.db'})" if done else "")
    )
    t0 = time.perf_counter()
    objective = _objective(optuna, recipe, space, out)
    study.optimize(objective, n_trials=max(trials - done, 0), callbacks=[_report(optuna)], catch=())
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise UserError("tune: no trial finished (all pruned or failed); widen tune.space or add trials")
    best = study.best_trial
    _write_results(study, recipe, out)
    console.print(
        f"best: trial {best.number}, val loss {best.value:.4f}, "
        f"{', '.join(f'{k}={_fmt(v)}' for k, v in best.params.items())} -> {out / 'best.yaml'} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    return {
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "trials": len(study.trials),
        "pruned": sum(t.state.name == "PRUNED" for t in study.trials),
    }


def _objective(optuna, recipe: Recipe, space: dict, out: Path):
    """A trial: fine-tune with its settings (metrics only), every evaluation reported to the pruner;
    scored by the best validation loss."""
    from lmkiln.train.finetune import build

    def objective(trial) -> float:
        params = suggest(trial, recipe, space)
        evaluations = [0]

        def on_eval(step: int, loss: float) -> None:
            evaluations[0] += 1
            trial.report(loss, evaluations[0])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at evaluation {evaluations[0]} (val loss {loss:.4f})")

        trial_dir = out / f"trial-{trial.number:03d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        quiet, console.quiet = console.quiet, True  # one line per trial, not each run's log
        try:
            metrics = build(with_params(recipe, params), trial_dir, on_eval=on_eval, save=False)
        finally:
            console.quiet = quiet
        return metrics["best_val_loss"]

    return objective


def _report(optuna):
    """The study's callback: a line per finished trial."""

    def report(study, trial) -> None:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        if trial.state == optuna.trial.TrialState.PRUNED:
            result = f"pruned after {len(trial.intermediate_values)} evaluations"
        else:
            best = " (best)" if study.best_trial.number == trial.number else ""
            result = f"val loss {trial.value:.4f}{best}"
        console.print(f"trial {trial.number}: {shown} -> {result}")

    return report


def _write_results(study, recipe: Recipe, out: Path) -> None:
    """best.yaml (the recipe with the best trial's settings, runnable as it is), trials.csv, trials.png."""
    best = study.best_trial
    best_recipe = with_params(recipe, best.params)
    write_text(
        out / "best.yaml",
        f"# kiln tune: trial {best.number} of {len(study.trials)}, best validation "
        f"loss {best.value:.4f}\n"
        + yaml.safe_dump(best_recipe.model_dump(mode="json", exclude_defaults=True, by_alias=True), sort_keys=False),
    )
    write_trials(study, out / "trials.csv")
    plot_trials(study, out / "trials.png")


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_trials(study, path: Path) -> None:
    keys = sorted({k for t in study.trials for k in t.params})
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", "state", "val_loss", "evaluations", "seconds", *keys])
        for t in study.trials:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else ""
            value = (
                t.value
                if t.value is not None
                else (min(t.intermediate_values.values()) if t.intermediate_values else "")
            )
            w.writerow(
                [
                    t.number,
                    t.state.name.lower(),
                    value,
                    len(t.intermediate_values),
                    round(seconds, 1) if seconds != "" else "",
                    *[t.params.get(k, "") for k in keys],
                ]
            )


def plot_trials(study, path: Path) -> None:
    """Each trial's validation curve (pruned ones dashed), and the best loss found so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, best) = plt.subplots(1, 2, figsize=(10, 4))
    for t in study.trials:
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            curves.plot(
                steps,
                [t.intermediate_values[s] for s in steps],
                marker=".",
                linestyle="--" if t.state.name == "PRUNED" else "-",
                label=f"trial {t.number}",
            )
    curves.set(xlabel="evaluation", ylabel="validation loss", title="trials (dashed: pruned)")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    pruned = [t for t in study.trials if t.state.name == "PRUNED" and t.intermediate_values]
    running = [min(t.value for t in done[: i + 1]) for i in range(len(done))]
    best.plot([t.number for t in done], [t.value for t in done], "o", label="trial")
    best.plot(
        [t.number for t in pruned],
        [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
        "x",
        label="pruned (its last loss)",
    )
    best.plot([t.number for t in done], running, "-", label="best so far")
    best.set(xlabel="trial", ylabel="best validation loss", title="search")
    for ax in (curves, best):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
