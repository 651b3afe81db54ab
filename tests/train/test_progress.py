"""The training progress bars show, from the first step, the running mean loss of the log interval under
way (the number metrics.jsonl will record for it) and the tokens/s of that interval."""

import pytest

from lmkiln import data, tokenizer
from lmkiln.train import loop, run_finetune, run_pretrain
from lmkiln.train.metrics import read_metrics


class Recording:
    """Stands in for the rich progress bar and keeps every field it is given."""

    def __init__(self) -> None:
        self.updates: list[dict] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def add_task(self, name, **fields) -> int:
        return 0

    def update(self, task, **fields) -> None:
        self.updates.append(fields)


def _bar_losses(bar: Recording) -> list[dict]:
    return [u for u in bar.updates if "loss" in u]


@pytest.mark.slow
def test_pretrain_bar_shows_the_interval_mean_and_rate_from_the_first_step(tiny_recipe, monkeypatch):
    recipe = tiny_recipe("pretrain.max_steps=4", "pretrain.log_every=2", "pretrain.eval_every=4")
    data.run(recipe)
    tokenizer.run(recipe)
    bar = Recording()
    monkeypatch.setattr(loop, "progress", lambda *a, **k: bar)
    run_pretrain(recipe)
    shown = _bar_losses(bar)
    assert len(shown) == 4 and shown[0]["tps"] > 0
    logged = {r["step"]: r["loss"] for r in read_metrics(recipe.run_dir / "pretrain" / "metrics.jsonl") if "loss" in r}
    assert shown[1]["loss"] == pytest.approx(logged[2], abs=1e-5)  # the bar at step 2 is the mean the log records
    assert shown[3]["loss"] == pytest.approx(logged[4], abs=1e-5)


def test_finetune_bar_shows_the_interval_mean_and_rate_from_the_first_step(
    trained_run, tiny_recipe, monkeypatch, tmp_path
):
    _, run_dir, _ = trained_run
    common = [f"finetune.base={run_dir / 'pretrain' / 'final'}", "finetune.epochs=1", "finetune.max_examples=24"]
    # every step logged: the loss of each step alone
    each = tiny_recipe(*common, "finetune.log_every=1", run_dir=tmp_path / "each")
    run_finetune(each)
    steps = [r["loss"] for r in read_metrics(each.run_dir / "finetune" / "metrics.jsonl") if "loss" in r]
    # logged every 3 steps: the bar shows the mean of the interval so far, at every step
    bar = Recording()
    monkeypatch.setattr(loop, "progress", lambda *a, **k: bar)
    run_finetune(tiny_recipe(*common, "finetune.log_every=3", run_dir=tmp_path / "third"))
    shown = _bar_losses(bar)
    assert len(shown) == len(steps) >= 4 and shown[0]["tps"] > 0
    for k, fields in enumerate(shown):
        interval = steps[k - k % 3 : k + 1]
        assert fields["loss"] == pytest.approx(sum(interval) / len(interval), abs=2e-5), k
