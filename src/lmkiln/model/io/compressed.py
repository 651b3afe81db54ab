"""compressed-tensors' layout of lmkiln's quantized weights: what `kiln quantize` writes, so that
transformers (with the `compressed-tensors` package) reads the directory back, and lmkiln reads it
as its own pieces (model/quant.py) without converting a byte of the codes.

- int8 ("naive-quantized", symmetric, one scale per output row): `X.weight` int8 (N, K) and
  `X.weight_scale` float32 (N, 1).
- int4 ("pack-quantized", symmetric, groups of 32): `X.weight_packed` int32 (N, K/8) holding
  code = q + 8 in 4 bits each, the first column in the lowest bits (so its bytes are lmkiln's two codes
  a byte, the even column low), `X.weight_scale` float32 (N, K/32), `X.weight_shape` int64 [N, K];
  w = (code - 8) * scale, which is lmkiln's w = code * scale + min with min = -8 * scale.

A matrix compressed-tensors quantizes is a Linear or an Embedding. A tied head is written as a
matrix of its own (`tie_word_embeddings: false`), int8 like the embedding: transformers would
otherwise multiply by the embedding's int8 codes as they are."""

from __future__ import annotations

from pathlib import Path

import torch

from lmkiln.errors import UserError
from lmkiln.model import quant

QUANT_METHOD = "compressed-tensors"
FORMATS = {"int8": "naive-quantized", "int4": "pack-quantized"}
WEIGHTS = {
    "int8": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
    "int4": {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": quant.GROUP,
        "dynamic": False,
    },
}
INT4_TARGETS = ["re:.*_proj$"]  # a block's linears; the embedding and the head are int8


def _group(targets: list[str], layout: str) -> dict:
    return {
        "targets": targets,
        "weights": WEIGHTS[layout],
        "format": FORMATS[layout],
        "input_activations": None,
        "output_activations": None,
    }


def quantization_config(layouts: dict[str, int]) -> dict:
    """config.json's quantization_config for a model with `layouts` ({layout: matrices})."""
    int8_only = set(layouts) == {"int8"}
    if int8_only:
        groups = {"group_0": _group(["Linear", "Embedding"], "int8")}
    else:
        groups = {"group_0": _group(INT4_TARGETS, "int4"), "group_1": _group(["Embedding", "re:.*lm_head$"], "int8")}
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMATS["int8"] if int8_only else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [],
        "kv_cache_scheme": None,
    }


def check_config(qc: dict, config_path: Path) -> None:
    """The compressed-tensors schemes lmkiln reads: its two (any other is a UserError naming it)."""
    for name, group in qc.get("config_groups", {}).items():
        weights = {k: v for k, v in (group.get("weights") or {}).items() if k in WEIGHTS["int4"]}
        activations = group.get("input_activations")
        if activations or weights not in (WEIGHTS["int8"], WEIGHTS["int4"]):
            raise UserError(
                f"{config_path}: quantization_config.config_groups.{name} is not a scheme lmkiln reads "
                f"(weights {weights}{', activations quantized' if activations else ''}); it reads int8 per "
                f"channel and int4 in groups of {quant.GROUP}, symmetric, weights only"
            )


def stored_specs(name: str, layout: str, shape) -> list[tuple[str, torch.dtype, tuple]]:
    """The safetensors entries of one quantized (N, K) weight."""
    base, (n, k) = name.removesuffix(".weight"), shape
    if layout == "int8":
        return [(f"{base}.weight", torch.int8, (n, k)), (f"{base}.weight_scale", torch.float32, (n, 1))]
    return [
        (f"{base}.weight_packed", torch.int32, (n, k // 8)),
        (f"{base}.weight_scale", torch.float32, (n, k // quant.GROUP)),
        (f"{base}.weight_shape", torch.int64, (2,)),
    ]


def stored_tensors(layout: str, pieces: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """lmkiln's pieces of a weight as the entries stored_specs names, in its order."""
    if layout == "int8":
        return [pieces["weight_int8"], pieces["weight_scale"].float()[:, None]]
    scale = pieces["weight_scale"].float()
    if not torch.equal(pieces["weight_min"].float(), -8 * scale):
        raise ValueError("compressed-tensors' int4 is symmetric: the minimum must be -8 * scale")
    packed = pieces["weight_int4"].contiguous()
    return [packed.view(torch.int32), scale, torch.tensor([packed.shape[0], packed.shape[1] * 2])]


def renamed(stored: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """A stored entry under lmkiln's piece name (None for `weight_shape`: the pieces' shapes are
    checked instead). A float `X.weight` is a dense weight, kept as it is."""
    base, _, leaf = stored.rpartition(".")
    if leaf == "weight" and tensor.dtype == torch.int8:
        return f"{base}.weight_int8", tensor
    if leaf == "weight_packed":
        return f"{base}.weight_int4", tensor.contiguous().view(torch.uint8)
    return None if leaf == "weight_shape" else (stored, tensor)


def completed(pieces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A weight's renamed pieces as lmkiln's layout has them, once both are read: int8's scale as one
    value per row, int4's minimum (-8 * scale) added."""
    if set(pieces) == {"weight_int8", "weight_scale"}:
        return {**pieces, "weight_scale": pieces["weight_scale"].reshape(-1)}
    if set(pieces) == {"weight_int4", "weight_scale"}:
        return {**pieces, "weight_min": -8 * pieces["weight_scale"].float()}
    return pieces
