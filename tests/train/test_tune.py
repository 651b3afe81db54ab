import csv

import pytest

from lmkiln.cli import main
from lmkiln.config import load_recipe

pytest.importorskip("optuna")


@pytest.mark.slow
def test_tune_runs_trials_and_writes_the_best_recipe(trained_run, tmp_path, capsys):
    _, run_dir, _ = trained_run
    base = run_dir / "pretrain" / "final"
    args = [
        "tune",
        f"run_dir={tmp_path / 'run'}",
        f"finetune.base={base}",
        "finetune.method=lora",
        f"finetune.data={trained_run[0].finetune.data}",
        "finetune.max_examples=48",
        "finetune.batch_size=8",
        "tune.space={lr: {low: 1e-4, high: 1e-2, log: true}, epochs: [1, 2], lora.r: [2, 8]}",
        "--trials",
        "4",
    ]
    assert main(args) == 0
    out = tmp_path / "run" / "tune"
    with open(out / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3"]
    assert all(r["state"] in ("complete", "pruned") for r in rows)
    finished = [float(r["val_loss"]) for r in rows if r["state"] == "complete"]
    best = load_recipe(out / "best.yaml")
    best_row = min((r for r in rows if r["state"] == "complete"), key=lambda r: float(r["val_loss"]))
    assert float(best_row["val_loss"]) == min(finished)
    assert best.finetune.lr == pytest.approx(float(best_row["lr"])) and best.finetune.lora.r == int(best_row["lora.r"])
    assert best.finetune.lora.alpha == 2 * best.finetune.lora.r  # alpha / r kept as the recipe had it (32 / 16)
    assert (out / "trials.png").stat().st_size > 0
    assert "best: trial" in capsys.readouterr().err
    # a rerun with more trials goes on from the stored study
    assert main(args[:-1] + ["5"]) == 0
    with open(out / "trials.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 5


def test_tune_rejects_an_unknown_key(tmp_path, capsys):
    code = main(["tune", f"run_dir={tmp_path}", "tune.space={lrate: [1, 2]}"])
    assert code == 2 and "tune.space: 'lrate' is not a finetune key" in capsys.readouterr().err
