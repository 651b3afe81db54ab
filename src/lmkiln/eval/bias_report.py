"""The bias probes' shares per axis, every model side by side: a markdown table (share and 95% interval)
and a chart (a point and its interval per model on each axis, 0.5 marked), for eval.md and the run
report. Two tuned models in one `kiln eval` (one trained with counterfactual augmentation, one without)
are compared the same way."""

from __future__ import annotations

from pathlib import Path


def bias_axes(results: dict) -> dict[str, dict[str, dict]]:
    """{task: {model: {axis: scores}}} for every bias task that reports axes."""
    found: dict[str, dict[str, dict]] = {}
    for model, res in results.items():
        for task, r in res.items():
            if isinstance(r, dict) and r.get("axes"):
                found.setdefault(task, {})[model] = {a["axis"]: a for a in r["axes"]}
    return found


def axis_line(who: str, a: dict) -> str:
    """One axis in plain words: share, interval, pairs, verdict, and each majority gender's share."""
    line = (
        f"{who} {a['axis']}: stereotype share {a['stereotype_share']:.3f} (95% interval {a['ci95'][0]:.3f} to "
        f"{a['ci95'][1]:.3f}, {a['pairs']} pairs): {a['verdict']}"
    )
    return line + "".join(
        f"; {group}-majority occupations {g['stereotype_share']:.3f}" for group, g in a.get("by_majority", {}).items()
    )


def bias_table(results: dict) -> str:
    """Markdown: a row per axis, a column per model, each cell the share and its interval."""
    out = []
    for task, models in bias_axes(results).items():
        names = list(models)
        out += [
            f"**{task}**: the share of minimal pairs where the model finds the stereotyping sentence likelier "
            "(0.5 = no preference), with its bootstrap 95% interval.",
            "",
            "| axis | pairs | " + " | ".join(names) + " |",
            "|---|---:|" + "---:|" * len(names),
        ]
        for label, cells in _rows(models):
            pairs = next(a["pairs"] for a in cells.values() if a)
            out.append(f"| {label} | {pairs} | " + " | ".join(_cell(cells[n]) for n in names) + " |")
        if any("by_majority" in a for m in models.values() for a in m.values()):
            out += [
                "",
                "Per majority gender: both above 0.5 is an association of occupation and pronoun; one high and "
                "the other low is one pronoun preferred everywhere.",
            ]
        out.append("")
    return "\n".join(out)


def _rows(models: dict[str, dict]) -> list[tuple[str, dict[str, dict | None]]]:
    """(label, {model: scores or None}) for each axis, then its parts by majority gender where it has them."""
    rows = []
    for axis in sorted({axis for m in models.values() for axis in m}):
        rows.append((axis, {n: m.get(axis) for n, m in models.items()}))
        parts = {n: m.get(axis, {}).get("by_majority", {}) for n, m in models.items()}
        for group in sorted({g for p in parts.values() for g in p}):
            rows.append((f"{axis}: {group}-majority", {n: p.get(group) for n, p in parts.items()}))
    return rows


def _cell(a: dict | None) -> str:
    return "–" if a is None else f"{a['stereotype_share']:.3f} ({a['ci95'][0]:.3f}–{a['ci95'][1]:.3f})"


def plot_bias(results: dict, path: Path) -> bool:
    """The chart of the first bias task with axes; False when there is none."""
    found = bias_axes(results)
    if not found:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmkiln.io import atomic_path

    task, models = next(iter(found.items()))
    rows = _rows(models)
    fig, ax = plt.subplots(figsize=(7, 0.7 + 0.55 * len(rows)))
    step = 0.8 / max(len(models), 1)
    for k, name in enumerate(models):
        ys, xs, lo, hi = [], [], [], []
        for i, (_, cells) in enumerate(rows):
            if a := cells[name]:
                ys.append(i - 0.4 + step * (k + 0.5))
                xs.append(a["stereotype_share"])
                lo.append(a["stereotype_share"] - a["ci95"][0])
                hi.append(a["ci95"][1] - a["stereotype_share"])
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", capsize=3, label=name)
    ax.axvline(0.5, color="#636363", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{task}: stereotype share (0.5 = no preference), 95% interval")
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return True
