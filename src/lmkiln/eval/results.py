"""A comparison's results, side by side: the columns they hold, the table (with the ICL scores that
differ from the first model's beyond a paired bootstrap interval starred), the figure, and the files
`kiln eval` writes (eval.json, eval.md, eval.png, and the bias table and chart)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmkiln.io import atomic_path, write_json, write_text

COLUMNS = [  # (task, metric, label, higher is better)
    ("perplexity", "loss", "held-out loss", False),
    ("perplexity", "bits_per_byte", "bits/byte", False),
    ("mlm", "loss", "held-out MLM loss", False),
    ("docstrings", "reply_loss", "docstring loss", False),
    ("docstrings", "rouge_l", "docstring ROUGE-L", True),
]


def columns_of(results: dict) -> list[tuple[str, str, str, bool]]:
    """(task, metric, label, higher is better) for every score the results hold, in the order the
    models first give them."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in results.values())]
    scores: dict = {}
    for r in results.values():
        scores.update({task: s for task, s in r.items() if task not in scores})
    for task, r in scores.items():
        if isinstance(r, dict) and r.get("kind") == "bias":
            cols.append((task, "pct_stereotype", f"{task} stereotype share (0.5 = none)", None))
        elif isinstance(r, dict) and "kind" in r:
            cols.append((task, "acc", f"{task} acc", True))
            if r["kind"] != "language_modeling":
                cols.append((task, "acc_norm", f"{task} acc_norm", True))
        elif isinstance(r, dict) and "accuracy" in r and "labels" in r:
            cols += [(task, "accuracy", f"{task} accuracy", True), (task, "macro_f1", f"{task} macro-F1", True)]
            cols.append((task, "majority_accuracy", f"{task} majority class", None))
        elif isinstance(r, dict) and "entity_f1" in r:
            cols += [(task, f"entity_{m}", f"{task} entity {m}", True) for m in ("precision", "recall", "f1")]
        elif isinstance(r, dict) and "token_f1" in r and task != "docstrings":
            cols += [
                (task, "reply_loss", f"{task} reply loss", False),
                (task, "exact_match", f"{task} exact match", True),
                (task, "token_f1", f"{task} token F1", True),
                (task, "rouge_l", f"{task} ROUGE-L", True),
            ]
            cols += [(task, m, f"{task} {label}", True) for m, label in (("bleu", "BLEU"), ("chrf", "chrF")) if m in r]
            cols += [
                (task, m, f"{task} {m.partition('/')[2] or m}", True) for m in r if m.partition("/")[0] == "reward"
            ]
    if "icl" in scores:
        cols.append(("icl", "centered", "ICL centered", True))
    return cols


def paired_bootstrap(base: list[int], other: list[int], iters: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(other) - mean(base) over documents resampled with replacement (paired: the
    same documents for both models)."""
    a, b = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(iters, len(a)))
    diffs = (b[idx] - a[idx]).mean(axis=1)
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def significant(results: dict) -> set[tuple[str, str]]:
    """(model, task) pairs whose ICL accuracy differs from the first model's beyond the bootstrap 95%
    interval (the interval excludes 0)."""
    names = list(results)
    marked = set()
    for name in names[1:]:
        for task, r in results[name].items():
            base = results[names[0]].get(task)
            if (
                isinstance(r, dict)
                and "correct" in r
                and isinstance(base, dict)
                and len(base.get("correct", [])) == len(r["correct"])
            ):
                low, high = paired_bootstrap(base["correct"], r["correct"])
                if low > 0 or high < 0:
                    marked.add((name, task))
    return marked


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    cols = columns_of(results)
    marked = significant(results)
    header = ["model"] + [label + {True: " ↑", False: " ↓", None: ""}[up] for _, _, label, up in cols]
    rows = []
    for name, r in results.items():
        rows.append(
            [name]
            + [
                f"{r[task][metric]:.4f}" + ("*" if metric == "acc" and (name, task) in marked else "")
                if task in r and r[task][metric] is not None
                else "–"
                for task, metric, _, _ in cols
            ]
        )
    return header, rows


def results_figure(results: dict):
    """One panel per score, a bar per model with its value on it; the y axis names the score and its
    direction, the x axis the models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns_of(results)
    if not cols:
        return None
    per_row = min(len(cols), 4)
    rows = (len(cols) + per_row - 1) // per_row
    fig, axes = plt.subplots(rows, per_row, figsize=(3.4 * per_row, 3.0 * rows), squeeze=False)
    names = list(results)
    for ax, (task, metric, label, up) in zip(axes.flat, cols):
        values = [results[n][task][metric] if task in results[n] else None for n in names]
        bars = ax.bar(
            range(len(names)), [0.0 if v is None else v for v in values], color=[f"C{i}" for i in range(len(names))]
        )
        ax.bar_label(bars, labels=["–" if v is None else f"{v:.4f}" for v in values], fontsize=7, padding=2)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel(
            metric.replace("_", " ")
            + {True: " (higher is better)", False: " (lower is better)"}.get(
                up, " (0.5 = no preference)" if metric == "pct_stereotype" else " (the baseline)"
            ),
            fontsize=7,
        )
        ax.set_xlabel("model", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7, ha="right")
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.15)  # room for the value labels above the tallest bar
    for ax in list(axes.flat)[len(cols) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_results(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = results_figure(results)
    if fig is None:
        return
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def markdown_table(results: dict) -> str:
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(results: dict) -> None:
    """Scores as rows, models as columns: it stays readable with many tasks in a terminal."""
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(results)
    table = Table(title="evaluation", show_edge=False)
    table.add_column("score", justify="left", no_wrap=True)
    for row in rows:
        table.add_column(row[0], justify="right", no_wrap=True)
    for i, label in enumerate(header[1:], 1):
        table.add_row(label, *[row[i] for row in rows])
    console = Console()
    if not console.is_terminal:  # a log file or pipe has no width to keep to: long task names stay whole
        console = Console(width=240)
    console.print(table)
    if significant(results):
        console.print("* ICL accuracy differs from the first model's beyond the paired bootstrap 95% interval")


def write_results(results: dict, out: Path) -> None:
    write_json(out / "eval.json", results)
    note = (
        "\n\\* ICL accuracy differs from the first model's beyond the paired bootstrap 95% interval.\n"
        if significant(results)
        else ""
    )
    from lmkiln.eval.bias_report import bias_table, plot_bias

    bias = ""
    if plot_bias(results, out / "bias.png"):
        bias = "\n## Bias probes per axis\n\n" + bias_table(results) + "\n![stereotype share per axis](bias.png)\n"
    text = "# Evaluation\n\n" + markdown_table(results) + note + "\n![scores](eval.png)\n" + bias
    write_text(out / "eval.md", text)
    plot_results(results, out / "eval.png")
