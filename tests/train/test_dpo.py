"""DPO: the loss against a hand computation, preference rows, and a run that learns the preference."""

import json
import math

import pytest
import torch

from lmkiln.data.examples import load_splits
from lmkiln.errors import UserError
from lmkiln.model.loss import IGNORE
from lmkiln.train import run_finetune
from lmkiln.train.dpo import dpo_loss, reply_logprobs
from tests.model.test_transformer import tiny


def _by_hand(model, ids, first_trained):
    """Sum of log p(ids[t] | ids[:t]) for t >= first_trained, one softmax at a time."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].double()
    total = 0.0
    for t in range(first_trained, len(ids)):
        row = logits[t - 1]
        total += row[ids[t]].item() - math.log(sum(math.exp(v) for v in row.tolist()))
    return total


def test_dpo_loss_matches_a_hand_computation():
    model = tiny()
    chosen, rejected = [5, 9, 14, 20, 33, 1], [5, 9, 14, 61, 62, 70, 1]  # shared prompt 5 9 14

    def encoded(ids):
        return ids, [IGNORE, IGNORE] + ids[3:] + [IGNORE]

    logp = reply_logprobs(model, [encoded(chosen), encoded(rejected)], pad_id=2, device=torch.device("cpu"))
    pc, pr = _by_hand(model, chosen, 3), _by_hand(model, rejected, 3)
    assert logp.tolist() == pytest.approx([pc, pr], abs=1e-4)
    ref_c, ref_r, beta = -12.5, -10.25, 0.2
    loss, margin = dpo_loss(logp[:1], logp[1:], torch.tensor([ref_c]), torch.tensor([ref_r]), beta)
    z = beta * ((pc - ref_c) - (pr - ref_r))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-z)), abs=1e-4)
    assert margin.item() == pytest.approx(z, abs=1e-4)


def test_preference_rows_are_validated(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hey"}],
            "rejected": "No.",
        },
        {"prompt": "Hi", "chosen": "Same", "rejected": "Same"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"prefs.jsonl:3: 'chosen' and 'rejected' are the same reply"):
        load_splits(str(path), 0.5, 0.05)
    splits = load_splits(str(path), 0.5, 0.05, on_bad_rows="skip")
    ok = splits["train"] + splits["val"]
    assert len(ok) == 2 and {ex["chosen"] for ex in ok} == {"Hello!", "Hey"}
    assert all(ex["prompt_messages"] == [{"role": "user", "content": "Hi"}] for ex in ok)


def _preferences(path, n=48):
    rows = [
        {
            "prompt": f"How do I reset my password for account {i}?",
            "chosen": "Open Settings, choose Security, then Reset password.",
            "rejected": "I cannot help with that. Please stop asking me things.",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dpo_learns_the_preference_and_saves_a_model(trained_run, tiny_recipe, tmp_path):
    _, run_dir, _ = trained_run
    recipe = tiny_recipe(
        f"finetune.data={_preferences(tmp_path / 'prefs.jsonl')}",
        "finetune.task=dpo",
        f"finetune.base={run_dir / 'pretrain' / 'final'}",
        "finetune.method=lora",
        "finetune.lr=5e-3",
        "finetune.epochs=2",
        "finetune.batch_size=8",
        "finetune.dpo_beta=0.5",
        run_dir=tmp_path / "run",
    )
    m = run_finetune(recipe)["metrics"]
    assert m["base_val_loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at the start
    assert m["best_val_loss"] < m["base_val_loss"] - 0.1 and m["val_reward_accuracy"] > 0.9, m
    assert (tmp_path / "run" / "finetune" / "final" / "model.safetensors").is_file()


def test_generate_task_refuses_preference_rows(trained_run, tiny_recipe, tmp_path):
    _, run_dir, _ = trained_run
    recipe = tiny_recipe(
        f"finetune.data={_preferences(tmp_path / 'prefs.jsonl', 8)}",
        f"finetune.base={run_dir / 'pretrain' / 'final'}",
        run_dir=tmp_path / "run",
    )
    with pytest.raises(UserError, match=r"prefs.jsonl:\d+ is a preference example; finetune.task=generate takes"):
        run_finetune(recipe)
