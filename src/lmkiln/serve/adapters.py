"""LoRA adapters served together on one base model. Each targeted Linear gets a wrapper that holds every
adapter's A and B; a forward adds to each row of the batch the update of the adapter its request
named, so requests for different adapters (and the base) share one continuous batch."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lmkiln.errors import UserError


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, owner: AdapterSet) -> None:
        super().__init__()
        self.base, self.owner = base, owner
        self.a: dict[int, torch.Tensor] = {}
        self.b: dict[int, torch.Tensor] = {}
        self.scaling: dict[int, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for index, rows in self.owner.groups.items():
            if index in self.a:
                part = x[rows] if rows is not None else x
                update = (part @ self.a[index].t()) @ self.b[index].t() * self.scaling[index]
                if rows is None:
                    y = y + update
                else:
                    y[rows] += update
        return y


class AdapterSet:
    def __init__(self, model: nn.Module) -> None:
        self.model, self.names = model, []
        self.groups: dict[int, torch.Tensor | None] = {}

    def add(self, name: str, adapter_dir: Path) -> int:
        """Load a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors); its index."""
        adapter_dir = Path(adapter_dir)
        config_path = adapter_dir / "adapter_config.json"
        if not config_path.is_file():
            raise UserError(f"--adapter {name}: '{adapter_dir}' has no adapter_config.json")
        cfg = json.loads(config_path.read_text())
        if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("fan_in_fan_out"):
            raise UserError(f"--adapter {name}: only LoRA adapters are served (peft_type {cfg.get('peft_type')})")
        if cfg.get("use_dora"):
            raise UserError(f"--adapter {name}: a DoRA adapter is served merged: kiln export {adapter_dir} OUT --merge")
        r, alpha = cfg["r"], cfg["lora_alpha"]
        scaling = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
        weights = load_file(adapter_dir / "adapter_model.safetensors")
        modules = dict(self.model.named_modules())
        index = len(self.names)
        for key, tensor in weights.items():
            path, _, part = key.removeprefix("base_model.model.").partition(".lora_")
            target = modules.get(path)
            if isinstance(target, MultiLoraLinear):
                target = target.base
            if not isinstance(target, nn.Linear) or part not in ("A.weight", "B.weight"):
                raise UserError(f"--adapter {name}: weight '{key}' has no linear layer in the base model")
            wrapper = self._wrap(path)
            want = (r, target.in_features) if part == "A.weight" else (target.out_features, r)
            if tuple(tensor.shape) != want:
                raise UserError(
                    f"--adapter {name}: '{key}' has shape {tuple(tensor.shape)}, the base model needs {want}"
                )
            store = wrapper.a if part == "A.weight" else wrapper.b
            store[index] = tensor.to(target.weight.device, target.weight.dtype)
            wrapper.scaling[index] = scaling
        self.names.append(name)
        return index

    def _wrap(self, path: str) -> MultiLoraLinear:
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        module = getattr(parent, child)
        if not isinstance(module, MultiLoraLinear):
            module = MultiLoraLinear(module, self)
            setattr(parent, child, module)
        return module

    def select(self, adapters: list[int]) -> None:
        """The adapter of each row of the next forward (-1: the base model alone)."""
        used = set(adapters) - {-1}
        if len(set(adapters)) == 1:
            self.groups = {a: None for a in used}  # every row the same adapter: no gather
            return
        device = next(self.model.parameters()).device
        self.groups = {a: torch.tensor([i for i, x in enumerate(adapters) if x == a], device=device) for a in used}
