"""Scores per group (`eval.group_by: COLUMN`), with Fairlearn's definitions, so the numbers are the ones
its `MetricFrame` and fairness metrics give on the same predictions (tests/eval/test_groups.py checks):

- each metric per group, and its largest gap: the best group's value minus the worst's
  (`MetricFrame.difference(method="between_groups")`);
- for a classifier, the demographic parity difference (the largest gap between groups in how often a
  label is predicted) and the equalized odds difference (the larger of the gaps in true-positive and in
  false-positive rate). For two labels they are those of the positive one (the second in sorted order,
  or `eval.positive_label`); with more, each label is taken one against the rest and the worst is
  reported, with its label.

Groups with fewer than `min_rows` rows (`eval.min_group_rows`) are listed but left out of the gaps and
differences: a group of two rows has an accuracy of 0, 0.5 or 1 and would decide the gap alone (1 gives
Fairlearn's numbers over every group).

A group with no row of what a rate is taken over (no positive rows, for the true-positive rate) has a rate
of 0, as scikit-learn's recall with its default zero_division gives."""

from __future__ import annotations

from lmkiln.eval.generative import macro_f1


def _gap(values: dict[str, float]) -> float:
    return round(max(values.values()) - min(values.values()), 5)


def _rate(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else 0.0


def _compared(groups: list[str], min_rows: int) -> list[str]:
    return [g for g in sorted(set(groups)) if groups.count(g) >= min_rows]


def metric_groups(groups: list[str], metrics: dict[str, list[float]], min_rows: int = 1) -> dict:
    """Each per-row metric's mean per group, the row count per group, and each metric's largest gap
    between the groups of at least `min_rows` rows."""
    names, compared = sorted(set(groups)), _compared(groups, min_rows)
    per = {g: {"n": groups.count(g)} for g in names}
    gaps = {}
    for metric, values in metrics.items():
        means = {g: sum(v for v, h in zip(values, groups) if h == g) / per[g]["n"] for g in names}
        for g in names:
            per[g][metric] = round(means[g], 5)
        gaps[metric] = _gap({g: means[g] for g in compared}) if compared else 0.0
    return {"groups": per, "gaps": gaps, "compared_groups": len(compared), "min_rows": min_rows}


def classifier_groups(
    groups: list[str], predicted: list[str], gold: list[str], positive: str | None = None, min_rows: int = 1
) -> dict:
    """Accuracy and macro-F1 per group with their gaps, and the demographic parity and equalized odds
    differences (rows whose prediction is None, a label the model does not know, are left out)."""
    kept = [(g, p, t) for g, p, t in zip(groups, predicted, gold) if p is not None]
    groups, predicted, gold = (list(x) for x in zip(*kept)) if kept else ([], [], [])
    labels = sorted(set(gold) | set(predicted))
    index = {label: i for i, label in enumerate(labels)}
    correct = [float(p == t) for p, t in zip(predicted, gold)]
    out = metric_groups(groups, {"accuracy": correct}, min_rows)
    names = _compared(groups, min_rows)
    if not names:
        return out
    f1 = {}
    for g in sorted(set(groups)):
        rows = [i for i, h in enumerate(groups) if h == g]
        f1[g] = macro_f1([index[predicted[i]] for i in rows], [index[gold[i]] for i in rows], len(labels))
        out["groups"][g]["macro_f1"] = round(f1[g], 5)
    out["gaps"]["macro_f1"] = _gap({g: f1[g] for g in names})
    if positive is not None and positive not in labels:
        raise ValueError(f"eval.positive_label '{positive}' is none of the task's labels ({', '.join(labels)})")
    considered = [positive] if positive else [labels[1]] if len(labels) == 2 else labels
    parity, odds = {}, {}
    for label in considered:
        selection = {g: _rate([p == label for p, h in zip(predicted, groups) if h == g]) for g in names}
        tpr = {
            g: _rate([p == label for p, t, h in zip(predicted, gold, groups) if h == g and t == label]) for g in names
        }
        fpr = {
            g: _rate([p == label for p, t, h in zip(predicted, gold, groups) if h == g and t != label]) for g in names
        }
        parity[label] = _gap(selection)
        odds[label] = max(_gap(tpr), _gap(fpr))
    worst_parity = max(parity, key=parity.get)
    worst_odds = max(odds, key=odds.get)
    out.update(
        demographic_parity_difference=parity[worst_parity],
        demographic_parity_label=worst_parity,
        equalized_odds_difference=odds[worst_odds],
        equalized_odds_label=worst_odds,
    )
    return out
