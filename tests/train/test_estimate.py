"""`kiln estimate` against a real CPU run's peak memory, measured in a fresh process."""

import json
import os
import subprocess
import sys

import pytest

from lmkiln import data, tokenizer
from lmkiln.cli import main
from lmkiln.train.estimate import estimate

MODEL = [
    "model.hidden_size=256",
    "model.num_layers=3",
    "model.num_heads=4",
    "model.num_kv_heads=4",
    "model.intermediate_size=688",
    "model.max_seq_len=256",
    "pretrain.seq_len=256",
    "pretrain.batch_size=16",
    "pretrain.max_steps=2",
    "pretrain.eval_batches=1",
    "pretrain.checkpoint_every=100",
]

PROBE = """
import json, os, sys
from pathlib import Path
from lmkiln.config import load_recipe
from lmkiln.log import set_quiet
from lmkiln.train import pretrain
from lmkiln.train.estimate import estimate
set_quiet(True)
recipe = load_recipe(None, sys.argv[1:])
predicted = estimate(recipe)["memory_bytes"]["total"]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss()
out = Path(recipe.run_dir) / "pretrain"
out.mkdir(parents=True, exist_ok=True)
pretrain.build(recipe, out)
# VmHWM is this address space's peak; ru_maxrss would carry the parent's peak across fork and exec
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"predicted": predicted, "measured": peak - base}))
"""


ENCODER = ["tokenizer.kind=encoder", "model.arch=modernbert", "model.local_attention=64"]


@pytest.fixture
def prepared(tiny_recipe):
    recipe = tiny_recipe(*MODEL)
    data.run(recipe)
    tokenizer.run(recipe)
    return recipe


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_estimate_within_20_percent_of_measured_cpu_peak(tiny_recipe, kind):
    """A decoder, and a ModernBERT encoder pretrained by masked-language modelling."""
    from tests.conftest import TINY

    extra = [*MODEL, *(ENCODER if kind == "encoder" else [])]
    prepared = tiny_recipe(*extra)
    data.run(prepared)
    tokenizer.run(prepared)
    overrides = [*TINY, f"run_dir={prepared.run_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.getcwd()}
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *overrides], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    ratio = figures["predicted"] / figures["measured"]
    assert 0.8 <= ratio <= 1.2, figures


@pytest.mark.slow
def test_estimate_scales_with_sharding_and_batch(prepared):
    one = estimate(prepared)["memory_bytes"]
    fsdp = prepared.model_copy(deep=True)
    fsdp.pretrain.strategy = "fsdp"
    two, four = estimate(fsdp, world=2)["memory_bytes"], estimate(fsdp, world=4)["memory_bytes"]
    assert four["optimizer"] * 4 == one["optimizer"] and four["activations"] == two["activations"]
    assert one["logits"] < four["logits"]  # one device runs the head a chunk at a time; FSDP has whole logits
    bigger = prepared.model_copy(deep=True)
    bigger.pretrain.batch_size *= 2
    assert estimate(bigger)["memory_bytes"]["activations"] == pytest.approx(2 * one["activations"], rel=0.01)


@pytest.mark.slow
def test_estimate_cli_prints_table(prepared, capsys):
    assert main(["estimate", f"run_dir={prepared.run_dir}", *MODEL]) == 0
    out = capsys.readouterr().out
    assert "memory: total" in out and "time per step" in out


@pytest.mark.slow
def test_estimate_of_an_encoder_counts_its_model_and_masked_head(tiny_recipe, capsys):
    """A ModernBERT recipe: the parameters of the model pretraining builds, its FLOPs, and a head loss that
    runs at the masked positions alone (a smaller share of the logits than a decoder's)."""
    from lmkiln.model.families.encoder import build_encoder_args

    recipe = tiny_recipe(*MODEL, *ENCODER)
    data.run(recipe)
    tokenizer.run(recipe)
    est = estimate(recipe)
    args = build_encoder_args(recipe.model, 512, {})
    assert est["parameters"] == args.num_params() and est["flops_per_token"] == args.flops_per_token(256)
    lower = recipe.model_copy(deep=True)
    lower.pretrain.mask_rate = 0.15
    assert estimate(lower)["memory_bytes"]["logits"] < est["memory_bytes"]["logits"]
    assert main(["estimate", f"run_dir={recipe.run_dir}", *MODEL, *ENCODER]) == 0
    assert "memory: total" in capsys.readouterr().out
