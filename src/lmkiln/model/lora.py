"""LoRA: low-rank adapters on chosen linear layers, saved in PEFT's layout so `peft` loads them.

PEFT names a wrapped layer's weights `<path>.base_layer.weight`, `<path>.lora_A.default.weight`,
`<path>.lora_B.default.weight`; in adapter_model.safetensors they are stored with the prefix
`base_model.model.` and without the adapter name.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lmkiln.io import write_json


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base
        self.r, self.scaling = r, alpha / r
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A["default"].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B["default"].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](self.dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            delta = self.lora_B["default"].weight @ self.lora_A["default"].weight * self.scaling
            self.base_layer.weight += delta.to(self.base_layer.weight.dtype)
        return self.base_layer


def apply_lora(model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float) -> list[str]:
    """Wrap every Linear whose name ends in a target; freeze everything else. Returns wrapped paths."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets and not name.endswith("lm_head"):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no layer matches LoRA targets {targets}")
    return wrapped


def merge_lora(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapter(model: nn.Module, out_dir: Path, base_model: str, r: int, alpha: float, dropout: float,
                 targets: list[str]) -> None:
    state = {}
    for key, value in lora_state(model).items():
        state["base_model.model." + key.replace(".default.", ".")] = value.contiguous().cpu()
    save_file(state, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    write_json(out_dir / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_dora": False,
        "use_rslora": False, "modules_to_save": None, "init_lora_weights": True,
    })
