import json

import pytest
import torch

from lmkiln import data, tokenizer
from lmkiln.data.examples import load_splits
from lmkiln.errors import UserError
from lmkiln.train import run_finetune, run_pretrain
from lmkiln.train.epochs import length_grouped_batches


@pytest.fixture
def pretrained(tiny_recipe):
    def make(*extra):
        recipe = tiny_recipe(*extra)
        data.run(recipe)
        tokenizer.run(recipe)
        run_pretrain(recipe)
        return recipe

    return make


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_lowers_validation_loss(pretrained, method):
    recipe = pretrained(f"finetune.method={method}", "finetune.lr=3e-3", "finetune.epochs=3", "finetune.lora.r=8")
    m = run_finetune(recipe)["metrics"]
    assert m["best_val_loss"] < m["base_val_loss"] and m["best_epoch"] >= 1
    out = recipe.run_dir / "finetune"
    assert (out / "final" / "model.safetensors").is_file()
    if method == "lora":
        cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
        assert m["trainable_parameters"] < 0.5 * m.get("total_parameters", 10**9)


@pytest.mark.slow
def test_lora_final_is_merged_and_loads_in_transformers(pretrained):
    transformers = pytest.importorskip("transformers")
    recipe = pretrained("finetune.method=lora", "finetune.epochs=1", "finetune.lr=3e-3")
    run_finetune(recipe)
    final = recipe.run_dir / "finetune" / "final"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert not any("lora" in n for n, _ in hf.named_parameters())


def test_jsonl_rows_are_validated(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: field 'output' must be a non-empty string"):
        load_splits(str(bad), 0.1, 0.05)


def test_jsonl_split_field_and_carved_validation(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)] + [
        {"instruction": "t", "output": "u", "split": "test"}
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_splits(str(path), 0.25, 0.05)
    assert len(splits["test"]) == 1 and 0 < len(splits["val"]) < 20
    assert len(splits["train"]) + len(splits["val"]) == 40


def test_length_grouped_batches_cover_every_example_once():
    import random

    lengths = [random.Random(i).randint(5, 300) for i in range(1000)]
    batches = length_grouped_batches(lengths, 8, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 20  # similar lengths share a batch: little padding


@pytest.mark.slow
def test_early_stopping_keeps_the_best_weights(pretrained):
    recipe = pretrained(
        "finetune.lr=0.5",
        "finetune.eval_every=2",
        "finetune.patience=2",
        "finetune.epochs=5",
        "finetune.warmup_steps=0",
    )
    m = run_finetune(recipe)["metrics"]
    assert m["stopped_early"] and m["steps"] < 5 * 12  # far fewer than five epochs of steps
    lines = [json.loads(line) for line in (recipe.run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in lines if "val_loss" in r]
    assert m["best_val_loss"] == min(vals) and len(vals) >= 3


@pytest.mark.slow
def test_packed_dora_finetune_learns_and_saves_a_peft_dora_adapter(pretrained):
    recipe = pretrained(
        "finetune.method=lora",
        "finetune.lora.dora=true",
        "finetune.packing=true",
        "finetune.gradient_checkpointing=true",
        "finetune.lr=3e-3",
        "finetune.epochs=3",
        "finetune.batch_size=2",
        "finetune.max_seq_len=256",
    )
    m = run_finetune(recipe)["metrics"]
    assert m["dora"] and m["packed_rows"] < m["examples"] / 2
    assert m["best_val_loss"] < m["base_val_loss"]
    cfg = json.loads((recipe.run_dir / "finetune" / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
