"""Generative tasks from data files: SQuAD-style exact match and token F1, generation on instruction
rows, and classification by label likelihood."""

import csv
import json
import math

import pytest
import torch

from lmkiln.cli import main
from lmkiln.eval.generative import exact_match, token_f1
from lmkiln.model.io.hub import load_model
from lmkiln.tokenizer.train import load_tokenizer


def test_exact_match_and_token_f1_on_hand_made_answers():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    # prediction "paris france" vs reference "in paris": one shared token; precision 1/2, recall 1/2
    assert token_f1("Paris, France", "in Paris") == pytest.approx(0.5)
    assert token_f1("", "") == 1.0 and token_f1("", "paris") == 0.0 and token_f1("london", "paris") == 0.0


def test_gen_tasks_generate_replies_and_score_labels(trained_run, tmp_path, capsys):
    _, run_dir, _ = trained_run
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(json.dumps({"instruction": f"Name the number {i}.", "output": f"{i}"}) + "\n" for i in range(4))
    )
    intents = tmp_path / "intents.csv"
    rows = [("cancel my order please", "cancel"), ("where is my parcel", "track"), ("stop the order", "cancel")]
    with open(intents, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["utterance", "intent"])
        w.writerows(rows)
    final = run_dir / "pretrain" / "final"
    code = main(
        ["eval", "--models", str(final), "--tasks", f"gen:{qa}", "eval.max_new_tokens=4", "--out", str(tmp_path / "a")]
    )
    assert code == 0
    res = json.loads((tmp_path / "a" / "eval.json").read_text())["pretrain/final"]
    assert res["qa"]["examples"] == 4 and len(res["qa"]["samples"]) == 4
    assert {"reply_loss", "exact_match", "token_f1", "rouge_l"} <= set(res["qa"])
    assert "qa token F1" in capsys.readouterr().out
    code = main(
        [
            "eval",
            "--models",
            str(final),
            "--tasks",
            f"gen:{intents}",
            "eval.columns={text: utterance, label: intent}",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert code == 0
    res = json.loads((tmp_path / "b" / "eval.json").read_text())["pretrain/final"]
    # the label with the higher likelihood after the text, computed by hand
    model, tok = load_model(final), load_tokenizer(final)

    def ll(text, label):
        ctx = tok.encode(text, add_special_tokens=False).ids
        whole = tok.encode(text + " " + label, add_special_tokens=False).ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), -1)
        return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))

    pred = [max(["cancel", "track"], key=lambda lab: ll(text, lab)) for text, _ in rows]
    accuracy = sum(p == g for p, (_, g) in zip(pred, rows)) / 3
    assert res["intents"]["labels"] == ["cancel", "track"]
    assert res["intents"]["accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert res["intents"]["majority_accuracy"] == pytest.approx(2 / 3, abs=1e-4) and not math.isnan(
        res["intents"]["macro_f1"]
    )


def test_gen_task_split_keeps_the_rows_finetuning_holds_out(tmp_path, capsys):
    from lmkiln.config import Recipe
    from lmkiln.data.examples import load_splits
    from lmkiln.eval.stage import generative_tasks

    data = tmp_path / "support.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"question {i}", "output": f"answer {i}"}) + "\n" for i in range(60))
    )
    recipe = Recipe.model_validate({"eval": {"tasks": [f"gen:{data}@val"], "max_examples": 100}})
    rows = generative_tasks(recipe)["support@val"]
    held_out = load_splits(str(data), recipe.finetune.val_fraction, recipe.data.val_fraction)["val"]
    assert 0 < len(rows) < 60 and {r["instruction"] for r in rows} == {r["instruction"] for r in held_out}
    assert main(["eval", "--models", "x", "--tasks", f"gen:{data}@dev", "--out", str(tmp_path / "o")]) == 2
    assert "the split after @ must be train, val or test" in capsys.readouterr().err
