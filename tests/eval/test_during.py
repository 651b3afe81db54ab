"""In-context tasks scored during pretraining and fine-tuning: into metrics.jsonl at every validation,
equal to `kiln eval`'s scoring of the same weights; bad task files stop the run before training."""

import json

import pytest

from lmkiln.cli import main
from lmkiln.config import load_recipe
from lmkiln.errors import UserError
from lmkiln.eval.icl import IclTask, evaluate_task
from lmkiln.model.inference.load import load_for_inference
from lmkiln.pipeline import run_recipe
from lmkiln.train.metrics import read_metrics
from tests.conftest import TINY

MC = [
    {"query": "def add(a, b):\n    return", "choices": [" a + b", " import os", " class"], "gold": 0},
    {"query": "import", "choices": [" os", " return", " ("], "gold": 0},
    {"query": "for i in", "choices": [" range(10):", " def", " else"], "gold": 0},
    {"query": "if x ==", "choices": [" 1:", " import", " class"], "gold": 0},
]
LM = [{"context": "def main(", "continuation": "):"}, {"context": "import o", "continuation": "s"}]


def _tasks(tmp_path):
    mc, lm = tmp_path / "pycode.jsonl", tmp_path / "pylm.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in MC))
    lm.write_text("".join(json.dumps(r) + "\n" for r in LM))
    return mc, lm


@pytest.mark.slow
def test_pretrain_scores_tasks_at_every_validation(tiny_recipe, tmp_path):
    mc, lm = _tasks(tmp_path)
    recipe = tiny_recipe(
        "stages=[data, tokenizer, pretrain]",
        f"pretrain.eval_tasks=[{mc}, {lm}, builtin:bias]",
        "pretrain.eval_tasks_max_examples=3",
    )
    results = run_recipe(recipe)
    out = recipe.run_dir / "pretrain"
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in rows] == [6, 12]
    for r in rows:
        assert {
            "eval/pycode/acc",
            "eval/pycode/acc_norm",
            "eval/pylm/acc",
            "eval/bias/pct_stereotype",
            "eval/icl/centered",
        } <= set(r)
    # the last validation scored the weights that were saved: kiln eval's scoring gives the same numbers
    final = out / "final"
    lm = load_for_inference(final)
    again = evaluate_task(lm.model, lm.tok, lm.chat, IclTask("pycode", str(mc), max_examples=3))
    assert again["n"] == 3
    assert rows[-1]["eval/pycode/acc"] == pytest.approx(again["acc"])
    assert rows[-1]["eval/pycode/acc_norm"] == pytest.approx(again["acc_norm"])
    assert results["pretrain"]["metrics"]["eval_tasks"]["eval/pycode/acc"] == rows[-1]["eval/pycode/acc"]


def test_finetune_scores_tasks_from_the_base_model_on(trained_run, tmp_path):
    _, run_dir, _ = trained_run
    mc, _ = _tasks(tmp_path)
    recipe = load_recipe(
        None,
        [
            "stages=[finetune]",
            f"run_dir={tmp_path / 'run'}",
            f"finetune.data={run_dir.parent / 'sft.jsonl'}",
            f"finetune.base={run_dir / 'pretrain' / 'final'}",
            "finetune.epochs=1",
            "finetune.batch_size=8",
            "finetune.max_seq_len=96",
            f"finetune.eval_tasks=[{mc}]",
        ],
    )
    results = run_recipe(recipe)
    rows = [r for r in read_metrics(tmp_path / "run" / "finetune" / "metrics.jsonl") if "val_loss" in r]
    assert rows[0]["step"] == 0 and len(rows) >= 2 and all("eval/pycode/acc" in r for r in rows)
    lm = load_for_inference(run_dir / "pretrain" / "final")
    base = evaluate_task(lm.model, lm.tok, lm.chat, IclTask("pycode", str(mc)))
    assert rows[0]["eval/pycode/acc"] == pytest.approx(base["acc"])
    assert results["finetune"]["metrics"]["base_eval_tasks"]["eval/pycode/acc"] == pytest.approx(base["acc"])
    assert (tmp_path / "run" / "finetune" / "loss.png").is_file()


@pytest.mark.slow
def test_a_malformed_task_line_stops_pretraining_before_it_starts(tiny_recipe, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MC[0]) + "\n" + '{"query": "x", "choices": ["a"]}\n')
    recipe = tiny_recipe("stages=[data, tokenizer]")
    run_recipe(recipe)
    code = main(["pretrain", *TINY, f"run_dir={recipe.run_dir}", f"pretrain.eval_tasks=[{bad}]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2:" in err
    assert not (recipe.run_dir / "pretrain").exists()


def test_classify_refuses_training_tasks(tmp_path):
    with pytest.raises(UserError, match="eval_tasks score a language model"):
        load_recipe(None, ["finetune.task=classify", "finetune.eval_tasks=[builtin:bias]"])
    with pytest.raises(UserError, match="'perplexity' is not an ICL task file"):
        load_recipe(None, ["pretrain.eval_tasks=[perplexity]"])
