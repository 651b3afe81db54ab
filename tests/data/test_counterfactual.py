"""Counterfactual augmentation on hand-made rows: case, possessives, her -> his or him, names, the rows
and fields it touches, and the counts it reports."""

import json

import pytest

from lmkiln.cli import main
from lmkiln.data.counterfactual import Swapper, augment, read_pairs
from tests.conftest import TINY

SWAP = Swapper(read_pairs(["builtin:gender", "builtin:names"]))


@pytest.mark.parametrize(
    "text,want",
    [
        ("He said she would come.", "She said he would come."),
        ("HE WAS THERE", "SHE WAS THERE"),
        ("The man's coat and the woman's hat", "The woman's coat and the man's hat"),
        ("I gave her book to him.", "I gave his book to her."),  # her before a noun: his
        ("I told her.", "I told him."),  # her at the end: him
        ("I saw her at the station with his brother", "I saw him at the station with her sister"),
        ("James met Mary's father", "Mary met James's mother"),
        ("Hero, shepherd, heather and Johnson stay", "Hero, shepherd, heather and Johnson stay"),  # whole words only
        ("The waitress thanked the actor himself", "The waiter thanked the actress herself"),
    ],
)
def test_swaps_keep_case_possessives_and_whole_words(text, want):
    assert SWAP.swap(text)[0] == want


def test_the_counts_name_each_swap():
    _, counts = SWAP.swap("He and his brother met her. He left.")
    assert counts == {"he -> she": 2, "his -> her": 1, "brother -> sister": 1, "her -> him": 1}


def test_add_keeps_rows_and_adds_swapped_copies_of_the_changed_ones_only():
    rows = [
        {"id": "a", "instruction": "What did he say?", "input": "", "output": "He said hello.", "split": None},
        {"id": "b", "messages": [{"role": "user", "content": "Ask James."}, {"role": "assistant", "content": "Done."}]},
        {"id": "c", "text": "Nothing to swap here.", "label": "he"},  # a label is never swapped
    ]
    out, stats = augment(rows, "add", 1.0, ["builtin:gender", "builtin:names"])
    assert out[:2] == [
        rows[0],
        {**rows[0], "id": "a#counterfactual", "instruction": "What did she say?", "output": "She said hello."},
    ]
    assert out[3]["messages"][0] == {"role": "user", "content": "Ask Mary."} and out[4] == rows[2]
    assert stats["rows_in"] == 3 and stats["rows_changed"] == 2 and stats["rows_out"] == 5
    assert stats["swaps"] == {"he -> she": 2, "james -> mary": 1}
    replaced, stats = augment(rows, "replace", 1.0, ["builtin:gender"])
    assert [r["id"] for r in replaced] == ["a#counterfactual", "b", "c"] and stats["rows_out"] == 3


def test_rate_swaps_the_same_share_of_rows_every_time():
    rows = [{"id": str(i), "text": "he ran"} for i in range(400)]
    first, stats = augment(rows, "replace", 0.25, ["builtin:gender"])
    again, _ = augment(rows, "replace", 0.25, ["builtin:gender"])
    assert first == again and 70 < stats["rows_changed"] < 130


def test_bad_pair_files_are_named(tmp_path):
    bad = tmp_path / "pairs.tsv"
    bad.write_text("he she\n")  # a space, not a tab
    with pytest.raises(Exception, match="pairs.tsv:1: expected two words separated by a tab"):
        read_pairs([str(bad)])
    with pytest.raises(Exception, match="builtin:gender, builtin:names"):
        read_pairs(["builtin:colour"])


@pytest.mark.slow
def test_finetune_with_counterfactual_augmentation_reports_the_swaps(trained_run, tmp_path):
    _, run_dir, _ = trained_run
    data = tmp_path / "sft.jsonl"
    rows = [{"instruction": f"What does he do? ({i})", "output": "He fixes cars."} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [*TINY, f"run_dir={tmp_path / 'run'}", f"finetune.base={run_dir / 'pretrain' / 'final'}"]
    argv += [f"finetune.data={data}", "finetune.epochs=1", "finetune.counterfactual.enabled=true"]
    assert main(["-q", "finetune", *argv]) == 0
    stats = json.loads((tmp_path / "run" / "finetune" / "manifest.json").read_text())["metrics"]["counterfactual"]
    train = stats["rows_in"]
    assert 0 < train < 24 and stats["rows_changed"] == train and stats["rows_out"] == 2 * train  # val untouched
    assert stats["swaps"] == {"he -> she": 2 * train}


def test_the_data_stage_adds_swapped_copies_to_the_training_split_only(tmp_path):
    import pyarrow.parquet as pq

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"{i}.txt").write_text(f"Story {i}. " + "He told his brother that the king would come soon. " * 4)
    argv = [f"run_dir={tmp_path / 'run'}", f"data.sources=[{docs}]", "data.val_fraction=0.2"]
    assert main(["-q", "data", *argv, "data.counterfactual.enabled=true", "data.near_dedup.enabled=false"]) == 0
    out = tmp_path / "run" / "data"
    stats = json.loads((out / "stats.json").read_text())["counterfactual"]
    train = [r for f in sorted(out.glob("train-*.parquet")) for r in pq.read_table(f).to_pylist()]
    val = [r for f in sorted(out.glob("val-*.parquet")) for r in pq.read_table(f).to_pylist()]
    copies = [r for r in train if r["id"].endswith("#counterfactual")]
    assert len(copies) == stats["rows_changed"] == stats["rows_in"] == len(train) - len(copies) > 0
    assert copies[0]["text"].count("She told her sister that the queen would come soon.") == 4
    assert not any(r["id"].endswith("#counterfactual") for r in val)
    assert stats["swaps"] == {
        k: 4 * len(copies) for k in ("he -> she", "his -> her", "brother -> sister", "king -> queen")
    }
    from lmkiln.report import _data_section

    report = "\n".join(_data_section(tmp_path / "run"))  # the run report says what was swapped
    assert f"{len(copies)} of {len(copies)} training documents had words swapped" in report
    assert f"he -> she {4 * len(copies)}" in report


@pytest.mark.slow
def test_a_run_with_augmentation_reports_probe_shares_and_task_scores_with_and_without_it(trained_run, tmp_path):
    """The run without augmentation is named into the augmented run's eval (`LABEL=DIR`), so the one run
    report shows base, tuned without and tuned with, side by side, and what augmentation swapped."""
    _, run_dir, _ = trained_run
    data = tmp_path / "sft.jsonl"
    rows = [{"instruction": f"What does he do? ({i})", "output": f"He fixes cars, {i} a day."} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = run_dir / "pretrain" / "final"
    common = [*TINY, f"finetune.base={base}", f"finetune.data={data}", "finetune.epochs=1"]
    assert main(["-q", "finetune", *common, f"run_dir={tmp_path / 'off'}"]) == 0
    on = tmp_path / "on"
    models = f"[base={base},without={tmp_path / 'off' / 'finetune' / 'final'},cda=finetune]"
    argv = [*common, f"run_dir={on}", "finetune.counterfactual.enabled=true", "stages=[finetune,eval]"]
    argv += [f"eval.models={models}", f"eval.tasks=[builtin:bias-small,gen:{data}@val]", "eval.max_new_tokens=4"]
    assert main(["-q", "run", *argv]) == 0
    results = json.loads((on / "eval" / "eval.json").read_text())
    assert list(results) == ["base", "without", "cda"]
    assert results["without"]["sft@val"]["reply_loss"] != results["cda"]["sft@val"]["reply_loss"]
    report = (on / "report.md").read_text()
    assert "| axis | pairs | base | without | cda |" in report.replace(" ↑", "").replace(" ↓", "")
    assert "| model |" in report and "| without |" in report and "sft@val" in report  # task scores per model
    assert "training rows had words swapped" in report and "he -> she" in report


def test_an_edited_pair_list_redoes_the_stage_that_read_it(tmp_path):
    from lmkiln.config import load_recipe
    from lmkiln.data import stage as data_stage
    from lmkiln.train import finetune

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("he\tshe\n")
    base = tmp_path / "base"  # the base model's identity is its weights' hash
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    argv = [f"data.counterfactual.pairs=[{pairs}]", f"finetune.counterfactual.pairs=[{pairs}]", f"finetune.base={base}"]
    recipe = load_recipe(None, [*argv, f"run_dir={tmp_path}"])
    recipe.finetune.counterfactual.enabled = True
    before = finetune.inputs_of(recipe), data_stage.inputs_of(recipe)
    pairs.write_text("he\tshe\nking\tqueen\n")
    after = finetune.inputs_of(recipe), data_stage.inputs_of(recipe)
    assert before[0] != after[0] and before[1] != after[1]
