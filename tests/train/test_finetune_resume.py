"""Fine-tuning resumes: a run killed with SIGKILL and run again ends where an uninterrupted run ends,
bit for bit on CPU (weights and every logged loss)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lmkiln.train import run_finetune
from lmkiln.train.checkpoint import stop_at_step_end
from tests.conftest import TINY

pytestmark = pytest.mark.slow


def _common(run_dir, method):
    return [
        f"finetune.base={run_dir / 'pretrain' / 'final'}",
        f"finetune.method={method}",
        "finetune.lora.r=4",
        "finetune.lora.dropout=0.1",
        "finetune.epochs=2",
        "finetune.batch_size=2",
        "finetune.eval_every=5",
        "finetune.checkpoint_every=2",
        "finetune.keep_checkpoints=2",
        "finetune.lr=3e-3",
    ]


def _losses(run_dir):
    """Every logged record but the wall-clock rate."""
    lines = (run_dir / "finetune" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]


def _kill_after_a_checkpoint(cmd, run_dir, env) -> None:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = run_dir / "finetune" / "checkpoints"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(ckpts.glob("step_*")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (run_dir / "finetune" / "manifest.json").exists(), "the run finished before it was killed"


GRPO = [
    "finetune.task=grpo",
    'finetune.rewards=[{fn: "lmkiln.eval.rewards:regex_match", args: {pattern: "def"}}]',
    "finetune.grpo.generations=2",
    "finetune.grpo.max_completion_tokens=8",
]


@pytest.mark.parametrize("method", ["lora", "full", "grpo"])
def test_sigkilled_finetune_resumes_to_the_same_weights(trained_run, tiny_recipe, tmp_path, method):
    """GRPO samples its completions inside each step: the checkpoint's RNG state makes the resumed
    run sample what the whole run sampled."""
    _, trained, _ = trained_run
    common = _common(trained, "lora" if method == "grpo" else method) + (GRPO if method == "grpo" else [])
    env = {**os.environ, "PYTHONPATH": os.getcwd()}

    def command(run_dir):
        data = tiny_recipe().finetune.data
        return [
            sys.executable,
            "-m",
            "lmkiln",
            "-q",
            "finetune",
            *TINY,
            f"run_dir={run_dir}",
            f"finetune.data={data}",
            *common,
        ]

    # Both runs in fresh processes alike, so thread pools and allocators are the same.
    subprocess.run(command(tmp_path / "whole"), env=env, check=True, capture_output=True)
    _kill_after_a_checkpoint(command(tmp_path / "killed"), tmp_path / "killed", env)
    res = subprocess.run(command(tmp_path / "killed"), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((tmp_path / "killed" / "finetune" / "manifest.json").read_text())
    assert (
        manifest["metrics"]["resumed_from"]
        and manifest["metrics"]["steps"]
        == json.loads((tmp_path / "whole" / "finetune" / "manifest.json").read_text())["metrics"]["steps"]
    )
    weights = "final/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    ours, ref = (load_file(tmp_path / r / "finetune" / weights) for r in ("killed", "whole"))
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "whole")
    assert not (tmp_path / "killed" / "finetune" / "checkpoints").exists()  # finished: nothing left to resume


def test_checkpoints_of_other_settings_are_not_resumed(trained_run, tiny_recipe, tmp_path):
    _, trained, _ = trained_run
    recipe = tiny_recipe(*_common(trained, "lora"), "finetune.epochs=1", run_dir=tmp_path / "run")
    ckpts = tmp_path / "run" / "finetune" / "checkpoints"
    (ckpts / "step_0000002").mkdir(parents=True)
    torch.save({"config_hash": "another run"}, ckpts / "step_0000002" / "trainer_state.pt")
    (ckpts / "step_0000002" / "trainable.safetensors").write_bytes(b"")
    assert run_finetune(recipe)["metrics"]["resumed_from"] is None


def test_ctrl_c_stops_at_the_end_of_the_step():
    with stop_at_step_end() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.asked  # the step under way goes on; the loop saves and stops after it
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: at once
