"""Checkpoints: an HF model directory plus trainer_state.pt (optimizer, step, RNG, config hash).

Each checkpoint is built under a temporary name and renamed whole, so resume only ever sees complete ones.
Model and optimizer states are full (unsharded), keyed by parameter name, so they load on any number
of ranks.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from lmkiln.io import atomic_dir
from lmkiln.model.hub import save_state
from lmkiln.model.transformer import ModelArgs

STATE = "trainer_state.pt"


def save_checkpoint(path: Path, args: ModelArgs, model_state: dict, optim_state: dict | None, step: int,
                    config_hash: str, tokenizer_dir: Path, extra_eos: list[int] | None = None,
                    extra: dict | None = None) -> None:
    with atomic_dir(path) as tmp:
        save_state(args, model_state, tmp, tokenizer_dir, extra_eos)
        torch.save({
            "step": step,
            "config_hash": config_hash,
            "optimizer": optim_state,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state()},
            **(extra or {}),
        }, tmp / STATE)


def latest_checkpoint(ckpt_dir: Path, config_hash: str) -> Path | None:
    """The newest complete checkpoint made with this config (others belong to a different run)."""
    if not ckpt_dir.is_dir():
        return None
    for path in sorted(ckpt_dir.glob("step_*"), reverse=True):
        state = path / STATE
        if state.is_file() and (path / "model.safetensors").is_file():
            if torch.load(state, map_location="cpu", weights_only=False)["config_hash"] == config_hash:
                return path
    return None


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(model state dict, trainer state) with the RNG state restored."""
    from safetensors.torch import load_file

    model_state = load_file(path / "model.safetensors")
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return model_state, state


def prune(ckpt_dir: Path, keep: int) -> None:
    for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
