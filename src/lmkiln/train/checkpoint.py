"""Checkpoints. Pretraining: an HF model directory plus trainer_state.pt (optimizer, step, RNG, config
hash). Fine-tuning: the trainable tensors (a LoRA adapter, or the whole model) in trainable.safetensors
plus trainer_state.pt (optimizer, loop position, validation guard, RNG).

Each checkpoint is built under a temporary name and renamed whole, so resume only ever sees complete ones.
Model and optimizer states are full (unsharded), keyed by parameter name, so they load on any number
of ranks.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from lmkiln.io import atomic_dir
from lmkiln.model.families.transformer import ModelArgs
from lmkiln.model.io.hub import save_state

STATE = "trainer_state.pt"


TRAINABLE = "trainable.safetensors"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: Path,
    args: ModelArgs,
    model_state: dict,
    optim_state: dict | None,
    step: int,
    config_hash: str,
    tokenizer_dir: Path,
    extra_eos: list[int] | None = None,
    extra: dict | None = None,
) -> None:
    with atomic_dir(path) as tmp:
        save_state(args, model_state, tmp, tokenizer_dir, extra_eos)
        torch.save(
            {
                "step": step,
                "config_hash": config_hash,
                "optimizer": optim_state,
                "rng": rng_state(),
                **(extra or {}),
            },
            tmp / STATE,
        )


def save_training_state(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """A fine-tuning checkpoint: the trainable tensors and the trainer's state (with the RNG's)."""
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / TRAINABLE)
        torch.save({**state, "rng": rng_state()}, tmp / STATE)


def read_training_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable tensors, trainer state) of a fine-tuning checkpoint; the RNG is restored later, at the
    loop position it was saved at (set_rng_state)."""
    from safetensors.torch import load_file

    return load_file(path / TRAINABLE), torch.load(path / STATE, map_location="cpu", weights_only=False)


def latest_checkpoint(ckpt_dir: Path, config_hash: str, weights: str = "model.safetensors") -> Path | None:
    """The newest complete checkpoint made with this config (others belong to a different run)."""
    if not ckpt_dir.is_dir():
        return None
    for path in sorted(ckpt_dir.glob("step_*"), reverse=True):
        state = path / STATE
        if state.is_file() and (path / weights).is_file():
            if torch.load(state, map_location="cpu", weights_only=False)["config_hash"] == config_hash:
                return path
    return None


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(model state dict, trainer state) with the RNG state restored."""
    from safetensors.torch import load_file

    model_state = load_file(path / "model.safetensors")
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return model_state, state


def prune(ckpt_dir: Path, keep: int) -> None:
    for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class StopRequest:
    """Ctrl-C or SIGTERM (a scheduler's preemption, `kill`) asks the loop to stop at the end of the step
    under way, so the checkpoint it saves holds a whole step; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.asked = False

    def __call__(self, signum, frame) -> None:
        if self.asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.asked = True


@contextlib.contextmanager
def stop_at_step_end() -> Iterator[StopRequest]:
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield request
        return
    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
