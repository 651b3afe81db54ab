"""LoRA and DoRA: low-rank adapters on chosen linear layers, saved in PEFT's layout so `peft` loads them.

PEFT names a wrapped layer's weights `<path>.base_layer.weight`, `<path>.lora_A.default.weight`,
`<path>.lora_B.default.weight` (and DoRA's `<path>.lora_magnitude_vector.default`); in
adapter_model.safetensors they are stored with the prefix `base_model.model.` and without the
adapter name.

DoRA (Liu et al. 2024) splits each adapted weight into a direction, W + s·BA normalised per output
row, and a learned magnitude m per row: W' = m · (W + s·BA) / ||W + s·BA||. As in the paper (4.3) and
PEFT, the norm is treated as a constant in the backward pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lmkiln.io import write_json


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, dora: bool = False) -> None:
        super().__init__()
        self.base_layer = base
        self.r, self.scaling = r, alpha / r
        self.off = False  # adapters_off: the base layer alone (GRPO's reference, no second model)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A["default"].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B["default"].weight)
        if dora:  # B = 0, so the magnitude starts at the base weight's row norms and W' = W
            norms = base.weight.detach().float().norm(dim=1).to(base.weight.dtype)
            self.lora_magnitude_vector = nn.ParameterDict({"default": nn.Parameter(norms)})

    def delta(self) -> torch.Tensor:
        return self.lora_B["default"].weight @ self.lora_A["default"].weight * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self.off:
            return base
        dropped = self.dropout(x)
        down = self.lora_A["default"](dropped)
        if not hasattr(self, "lora_magnitude_vector"):
            # base + scaling * down @ B^T in one addmm: no separate scaled update to write, add and free
            out = torch.addmm(
                base.reshape(-1, base.shape[-1]),
                down.reshape(-1, self.r),
                self.lora_B["default"].weight.t(),
                alpha=self.scaling,
            )
            return out.view(base.shape)
        update = self.lora_B["default"](down) * self.scaling
        weight = self.base_layer.weight
        scale = self.lora_magnitude_vector["default"] / (weight + self.delta().detach()).norm(dim=1).detach()
        if dropped is x:
            plain = base if self.base_layer.bias is None else base - self.base_layer.bias
        else:  # PEFT applies the magnitude to the dropped-out input's base output
            plain = F.linear(dropped, weight)
        return base + (scale - 1) * plain + scale * update

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            weight = self.base_layer.weight
            merged = weight.float() + self.delta().float()
            if hasattr(self, "lora_magnitude_vector"):
                merged *= (self.lora_magnitude_vector["default"].float() / merged.norm(dim=1))[:, None]
            weight.copy_(merged.to(weight.dtype))
        return self.base_layer


def apply_lora(
    model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float, dora: bool = False
) -> list[str]:
    """Wrap every Linear whose name ends in a target; freeze everything else. Returns wrapped paths."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets and not name.endswith("lm_head"):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout, dora))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no layer matches LoRA targets {targets}")
    return wrapped


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The base model inside the block: every LoRA layer gives its base layer's output alone."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.off = True
    try:
        yield
    finally:
        for m in layers:
            m.off = False


def merge_lora(model: nn.Module) -> None:
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def peft_key(key: str) -> str:
    """Our state_dict key -> its name in PEFT's adapter_model.safetensors."""
    return "base_model.model." + re.sub(r"\.default(?=\.|$)", "", key)


def save_adapter(
    model: nn.Module,
    out_dir: Path,
    base_model: str,
    r: int,
    alpha: float,
    dropout: float,
    targets: list[str],
    dora: bool = False,
) -> None:
    state = {peft_key(key): value.contiguous().cpu() for key, value in lora_state(model).items()}
    save_file(state, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    write_json(
        out_dir / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": dropout,
            "target_modules": sorted(targets),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "use_dora": dora,
            "use_rslora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
        },
    )
