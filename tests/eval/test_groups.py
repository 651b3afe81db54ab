"""`eval.group_by`: scores per group, their gaps, and a classifier's demographic parity and equalized odds
differences, equal to Fairlearn's MetricFrame and fairness metrics on the same predictions."""

import json
import random

import pytest

from lmkiln.cli import main
from lmkiln.eval.groups import classifier_groups, metric_groups

fairlearn = pytest.importorskip("fairlearn.metrics")
sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _fairlearn(groups, predicted, gold, label):
    """Fairlearn's numbers: per-group accuracy and macro-F1, their gaps, and, for `label` one against the
    rest, the demographic parity and equalized odds differences."""
    frame = fairlearn.MetricFrame(
        metrics={
            "accuracy": sklearn_metrics.accuracy_score,
            "macro_f1": lambda t, p: sklearn_metrics.f1_score(t, p, average="macro"),
        },
        y_true=gold,
        y_pred=predicted,
        sensitive_features=groups,
    )
    binary_true = [int(t == label) for t in gold]
    binary_pred = [int(p == label) for p in predicted]
    parity = fairlearn.demographic_parity_difference(binary_true, binary_pred, sensitive_features=groups)
    odds = fairlearn.equalized_odds_difference(binary_true, binary_pred, sensitive_features=groups)
    return frame, parity, odds


@pytest.mark.parametrize("labels", [["no", "yes"], ["billing", "cancel", "refund", "track"]])
def test_classifier_groups_equal_fairlearns_metric_frame_and_fairness_metrics(labels):
    rng = random.Random(len(labels))
    groups = [rng.choice(["18-30", "31-50", "51+"]) for _ in range(300)]
    gold = [rng.choice(labels) for _ in groups]
    # a classifier that is right more often for one group: the metrics have something to find
    predicted = [
        t if rng.random() < (0.9 if g == "18-30" else 0.6) else rng.choice(labels) for t, g in zip(gold, groups)
    ]
    ours = classifier_groups(groups, predicted, gold)
    frame = None
    worst_parity, worst_odds = 0.0, 0.0
    for label in labels[1:] if len(labels) == 2 else labels:
        frame, parity, odds = _fairlearn(groups, predicted, gold, label)
        worst_parity, worst_odds = max(worst_parity, parity), max(worst_odds, odds)
    by_group = frame.by_group
    for g in ("18-30", "31-50", "51+"):
        assert ours["groups"][g]["accuracy"] == pytest.approx(by_group.loc[g, "accuracy"], abs=1e-5)
        assert ours["groups"][g]["macro_f1"] == pytest.approx(by_group.loc[g, "macro_f1"], abs=1e-5)
    gaps = frame.difference(method="between_groups")
    assert ours["gaps"]["accuracy"] == pytest.approx(gaps["accuracy"], abs=1e-5)
    assert ours["gaps"]["macro_f1"] == pytest.approx(gaps["macro_f1"], abs=1e-5)
    assert ours["demographic_parity_difference"] == pytest.approx(worst_parity, abs=1e-5)
    assert ours["equalized_odds_difference"] == pytest.approx(worst_odds, abs=1e-5)
    assert ours["gaps"]["accuracy"] > 0.1  # the planted gap is found
    small = classifier_groups(groups + ["tiny"], predicted + [gold[0]], gold + [gold[0]], min_rows=10)
    assert small["groups"]["tiny"]["n"] == 1 and small["compared_groups"] == 3  # listed, not compared
    assert small["gaps"]["accuracy"] == ours["gaps"]["accuracy"]


def test_metric_groups_equal_fairlearns_means():
    rng = random.Random(0)
    groups = [rng.choice("abc") for _ in range(100)]
    scores = [rng.random() for _ in groups]
    frame = fairlearn.MetricFrame(
        metrics=lambda t, p: sum(p) / len(p), y_true=scores, y_pred=scores, sensitive_features=groups
    )
    ours = metric_groups(groups, {"token_f1": scores})
    for g in "abc":
        assert ours["groups"][g]["token_f1"] == pytest.approx(frame.by_group[g], abs=1e-5)
        assert ours["groups"][g]["n"] == groups.count(g)
    assert ours["gaps"]["token_f1"] == pytest.approx(frame.difference(), abs=1e-5)


def test_kiln_eval_group_by_on_classification_and_generative_rows(trained_run, tmp_path):
    """The group column of gen: rows reaches eval.json: per-group scores of the model's own predictions,
    equal to Fairlearn's on the predictions eval.json holds."""
    _, run_dir, _ = trained_run
    rows = [
        {"text": f"{w} my order please ({i})", "label": lab, "region": region}
        for i, (w, lab, region) in enumerate(
            [("cancel", "cancel", "north"), ("track", "track", "south"), ("stop", "cancel", "south")] * 8
        )
    ]
    intents = tmp_path / "intents.jsonl"
    intents.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(
            json.dumps({"instruction": f"Name {i}.", "output": f"{i}", "region": "north" if i % 2 else "south"}) + "\n"
            for i in range(6)
        )
    )
    final = run_dir / "pretrain" / "final"
    argv = ["eval", "--models", str(final), "--tasks", f"gen:{intents}", f"gen:{qa}", "--out", str(tmp_path / "o")]
    assert main([*argv, "eval.group_by=region", "eval.min_group_rows=1", "eval.max_new_tokens=3"]) == 0
    res = json.loads((tmp_path / "o" / "eval.json").read_text())["pretrain/final"]
    grouped = res["intents"]["by_group"]
    assert grouped["column"] == "region" and set(grouped["groups"]) == {"north", "south"}
    frame, parity, odds = _fairlearn(
        [r["region"] for r in rows], res["intents"]["predicted"], [r["label"] for r in rows], "track"
    )
    assert grouped["gaps"]["accuracy"] == pytest.approx(frame.difference()["accuracy"], abs=1e-5)
    assert grouped["demographic_parity_difference"] == pytest.approx(parity, abs=1e-5)
    assert grouped["equalized_odds_difference"] == pytest.approx(odds, abs=1e-5)
    qa_groups = res["qa"]["by_group"]["groups"]
    assert {g: v["n"] for g, v in qa_groups.items()} == {"north": 3, "south": 3}
    missing = ["eval", "--models", str(final), "--tasks", f"gen:{qa}", "eval.group_by=country"]
    assert main([*missing, "--out", str(tmp_path / "p")]) == 2  # a row without the column: named, before scoring


def test_the_run_report_shows_each_groups_score_per_model_and_the_gaps():
    from lmkiln.report import _group_lines

    groups = ["north"] * 12 + ["south"] * 12 + ["east"] * 2
    gold = ["a", "b"] * 13
    base = classifier_groups(groups, ["a"] * 26, gold, min_rows=10)
    tuned = classifier_groups(groups, gold, gold, min_rows=10)
    lines = _group_lines(
        "intents", {"pretrain": {"column": "region", **base}, "finetune": {"column": "region", **tuned}}
    )
    text = "\n".join(lines)
    assert lines[0] == "### intents by region"
    assert "| north | 12 | 0.5000 | 1.0000 |" in text and "| east | 2 | 0.5000 | 1.0000 |" in text
    assert "| **largest gap** | | 0.0000 | 0.0000 |" in text
    assert "| **demographic parity difference** |" in text and "over the 2 groups of 10+ rows" in text
