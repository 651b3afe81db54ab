"""Model directories whose linear weights are stored quantized (model/quant.py has the two layouts), in
lmkiln's names or in compressed-tensors' (model/io/compressed.py).

In lmkiln's, config.json carries `quantization_config: {"quant_method": "lmkiln", "layouts": {...}}`, naming how many
weights each layout holds; model.safetensors holds each quantized weight as its pieces, every other
tensor (norms, biases) as it is. Loading builds the model on the meta device and puts each quantized
weight straight into its quantized module, so memory holds the quantized bytes, never a float copy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lmkiln.errors import UserError
from lmkiln.model import quant
from lmkiln.model.io import compressed
from lmkiln.model.io.hub import (
    assign_weight,
    build_model,
    check_missing,
    check_weight,
    expected_shapes,
    model_weight_name,
    read_config,
    read_shard,
    skipped_weight,
    tied_head,
    weight_shards,
)

QUANT_METHOD = "lmkiln"
EMBEDDING = "model.embed_tokens"


def quant_layouts(model_dir: Path) -> dict[str, int] | None:
    """{layout: weights} of a quantized directory (counts unknown for compressed-tensors' layout: 0);
    None for a dense one."""
    qc = read_config(model_dir).get("quantization_config")
    if qc is None:
        return None
    if qc.get("quant_method") == compressed.QUANT_METHOD:
        compressed.check_config(qc, model_dir / "config.json")
        return {"int4" if g["weights"]["num_bits"] == 4 else "int8": 0 for g in qc["config_groups"].values()}
    if qc.get("quant_method") != QUANT_METHOD:
        raise UserError(
            f"{model_dir / 'config.json'}: quantization_config.quant_method {qc.get('quant_method')!r} is not "
            f"supported (lmkiln reads its own '{QUANT_METHOD}' layout and '{compressed.QUANT_METHOD}' "
            "int8/int4; import a dense copy of the model)"
        )
    return dict(qc.get("layouts", {}))


def quantization_config(layouts: dict[str, int]) -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "layouts": layouts,
        "int8": "int8 per weight, one float32 scale per output row: w = q * scale",
        "int4": f"4-bit codes, two per byte (even column low), groups of {quant.GROUP} along the input, "
        "a float32 scale and minimum each: w = code * scale + min",
    }


def quantizable(name: str, shape) -> bool:
    """The weights a quantized model holds quantized: every matrix (linears and the embedding)."""
    return name.endswith(".weight") and len(shape) == 2


def stored_specs(name: str, layout: str | None, shape, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple]]:
    """The safetensors entries of one weight: itself, or its quantized pieces."""
    if layout is None:
        return [(name, dtype, tuple(shape))]
    base = name.removesuffix(".weight")
    return [(f"{base}.{piece}", dt, s) for piece, (s, dt) in quant.piece_shapes(layout, tuple(shape)).items()]


def quantized_weights(model_dir: Path, args) -> Iterator[tuple[str, str | None, dict[str, torch.Tensor]]]:
    """(weight name, layout or None, {piece: tensor}) for every weight, pieces gathered per weight and
    checked by name and shape against what config.json implies."""
    expected = expected_shapes(args)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    seen = set()
    in_compressed = read_config(model_dir)["quantization_config"]["quant_method"] == compressed.QUANT_METHOD
    for shard in weight_shards(model_dir):
        for stored, tensor in read_shard(shard):
            if in_compressed:  # its names and shapes as lmkiln's
                renamed = compressed.renamed(stored, tensor)
                if renamed is None:
                    continue
                stored, tensor = renamed
            found = quant.stored_piece(stored)
            if found is None:  # a weight stored as it is: checked as hub.iter_checked_weights checks it
                name = model_weight_name(stored, args)
                if skipped_weight(name, args):
                    continue
                check_weight(shard, name, tensor.shape, expected)
                seen.add(name)
                yield name, None, {"weight": tensor}
                continue
            path, piece = found
            name = f"{path}.weight"
            if name not in expected:
                raise UserError(f"{shard}: weight '{stored}' is not part of the model config.json describes")
            pieces = pending.setdefault(name, {})
            pieces[piece] = tensor
            if in_compressed:
                pending[name] = pieces = compressed.completed(pieces)
            layout = quant.layout_of(pieces)
            if layout is None:
                continue
            for piece, (shape, dtype) in quant.piece_shapes(layout, tuple(expected[name])).items():
                got = pieces[piece]
                if tuple(got.shape) != shape or got.dtype != dtype:
                    raise UserError(
                        f"{shard}: '{path}.{piece}' is {got.dtype} {list(got.shape)}; the {layout} layout of "
                        f"'{name}' needs {dtype} {list(shape)}"
                    )
            seen.add(name)
            yield name, layout, pending.pop(name)
    if pending:
        name = next(iter(pending))
        raise UserError(f"{model_dir}: quantized weight '{name}' is missing pieces")
    check_missing(model_dir, expected, seen, args)


SUMMED = ("o_proj", "gate_up_proj", "gate_proj", "up_proj", "down_proj")  # outputs that only meet a sum
# linears of one block that read the same input: stored apart (HF's names), run as one matmul
FUSED = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")), "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}


def load_quantized(model_dir: Path, args, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a quantized directory, for inference: quantized modules where the pieces are (a
    block's q/k/v, and its gate/up, fused into one module each when they share a layout), fp32
    elsewhere. Each module is built as soon as its weights are read, so memory holds little besides it."""
    with torch.device("meta"):
        model = build_model(args)
    group_of = {
        f"model.layers.{b}.{part}.{m}": (f"model.layers.{b}.{part}", fused, members)
        for b in range(getattr(args, "num_layers", 0))
        for part, (fused, members) in FUSED.items()
        for m in members
    }
    waiting: dict[str, dict[str, tuple[str, dict]]] = {}  # a fused group's members read so far
    biases: dict[str, torch.Tensor] = {}
    for name, layout, pieces in quantized_weights(model_dir, args):
        path = name.removesuffix(".weight")
        if layout is None:
            if name.endswith(".bias"):
                biases[name] = pieces["weight"].float()  # put in place once its linear exists
            else:
                assign_weight(model, name, pieces["weight"].float())
            continue
        pieces = {k: v.to(device) for k, v in pieces.items()}
        if path == EMBEDDING:
            _install(model, path, quant.QuantEmbedding(layout, pieces))
            if tied_head(args) is not None:
                _install(model, "lm_head", quant.quant_linear(layout, pieces))
        elif path in group_of:
            parent, fused, members = group_of[path]
            got = waiting.setdefault(parent, {})
            got[path.rsplit(".", 1)[1]] = (layout, pieces)
            if len(got) == len(members):
                _install_group(model, parent, fused, [got.pop(m) for m in members])
                del waiting[parent]
        else:
            _install(model, path, quant.quant_linear(layout, pieces))
    fused_biases: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in biases.items():
        path = name.removesuffix(".bias")
        parent, fused, _ = group_of.get(path, ("", "", ()))
        if parent and getattr(model.get_submodule(parent), fused) is not None:
            fused_biases.setdefault(parent, {})[path.rsplit(".", 1)[1]] = tensor
        else:
            model.get_submodule(path).bias = nn.Parameter(tensor, requires_grad=False)
    for parent, got in fused_biases.items():
        fused, members = FUSED[parent.rsplit(".", 1)[1]]
        if set(got) != set(members):
            raise UserError(f"{model_dir}: '{parent}' has biases for {sorted(got)} only, of {list(members)}")
        joined = torch.cat([got[m] for m in members])
        getattr(model.get_submodule(parent), fused).bias = nn.Parameter(joined, requires_grad=False)
    for name, module in model.named_modules():
        if name.endswith(SUMMED) and isinstance(module, (quant.Int8Linear, quant.Int4Linear)):
            module.out_dtype = quant.KERNEL_DTYPE  # its output only meets the fp32 stream in a sum
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left or waiting:
        raise UserError(f"{model_dir}: weights missing, e.g. '{left[0] if left else next(iter(waiting))}'")
    model.after_load()
    return model.to(device).eval()


def _install_group(model: nn.Module, parent: str, fused: str, parts: list[tuple[str, dict]]) -> None:
    """One module for a block's linears that read the same input, when all are quantized alike; else
    each in its own place."""
    module = model.get_submodule(parent)
    members = FUSED[parent.rsplit(".", 1)[1]][1]
    layouts = {layout for layout, _ in parts}
    if len(layouts) > 1:
        for member, (layout, pieces) in zip(members, parts):
            setattr(module, member, quant.quant_linear(layout, pieces))
        return
    layout = layouts.pop()
    setattr(module, fused, quant.quant_linear(layout, quant.concat_pieces(layout, [p for _, p in parts])))
    module.fused_sizes = [next(iter(p.values())).shape[0] for _, p in parts]
    for member in members:
        setattr(module, member, None)


def _install(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
