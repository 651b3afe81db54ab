"""The align stage: a second fine-tuning (GRPO here) on the supervised model of the same run, in its own
folder, compared with the base and the SFT model by eval.rewards; its mistakes name `align.` keys."""

import json

import pytest

from lmkiln.cli import main
from lmkiln.errors import UserError
from lmkiln.pipeline import run_recipe

REWARD = '{fn: "lmkiln.eval.rewards:regex_match", args: {pattern: "says"}, name: says}'


def _recipe(tiny_recipe, trained_run, tmp_path, *extra):
    _, run_dir, _ = trained_run
    data = tiny_recipe().finetune.data
    return tiny_recipe(
        "stages=[finetune, align, eval]",
        f"finetune.base={run_dir / 'pretrain' / 'final'}",
        "finetune.epochs=1",
        f"align.data={data}",
        f"align.rewards=[{REWARD}]",
        "align.method=lora",
        "align.lr=1e-2",
        "align.epochs=1",
        "align.batch_size=4",
        "align.max_examples=8",
        "align.grpo.generations=2",
        "align.grpo.max_completion_tokens=8",
        "eval.models=[base=pretrain, sft=finetune, grpo=align]",
        f"eval.tasks=[gen:{data}@val]",
        f"eval.rewards=[{REWARD}]",
        *extra,
        run_dir=tmp_path / "run",
    )


def test_sft_then_grpo_in_one_run_compared_side_by_side(trained_run, tiny_recipe, tmp_path):
    recipe = _recipe(tiny_recipe, trained_run, tmp_path, "eval.models=[sft=finetune, grpo=align]")
    run_recipe(recipe)
    run = tmp_path / "run"
    manifest = json.loads((run / "align" / "manifest.json").read_text())
    assert manifest["config"]["align"]["task"] == "grpo" and manifest["config"]["align"]["base"] == "finetune"
    assert manifest["metrics"]["task"] == "grpo" and (run / "align" / "final" / "model.safetensors").is_file()
    results = json.loads((run / "eval" / "eval.json").read_text())
    assert list(results) == ["sft", "grpo"]
    for scores in results.values():
        (task,) = [t for t in scores if isinstance(scores[t], dict) and "samples" in scores[t]]
        r = scores[task]
        assert 0 <= r["reward/says"] <= 1 and r["reward"] == r["reward/says"]
        assert all("reward" in s for s in r["samples"])
    report = (run / "report.md").read_text()
    assert "## Alignment" in report and "| validation (greedy replies) | reward | says |" in report
    assert "says ↑" in report  # the reward's column in the side-by-side table
    again = run_recipe(recipe)  # every stage current: nothing reruns
    assert all(m.get("skipped") for m in again.values())


def test_align_mistakes_name_align_keys(tiny_recipe, trained_run, tmp_path, capsys):
    recipe = _recipe(tiny_recipe, trained_run, tmp_path, "align.rewards=[no_such_module:f]")
    with pytest.raises(UserError, match=r"^align\.rewards: 'no_such_module:f': cannot import"):
        run_recipe(recipe)
    assert not (tmp_path / "run").exists()  # refused before any stage ran
    path = tmp_path / "r.yaml"
    path.write_text("align:\n  task: generate\n")
    assert main(["align", str(path)]) == 2
    assert "align.task" in capsys.readouterr().err
