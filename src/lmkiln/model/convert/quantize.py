"""`kiln quantize MODEL OUT --quant int8|int4`: any dense decoder directory (imported, or trained by
lmkiln) into one whose matrices are kept quantized (model/quant.py has the two layouts), written in
compressed-tensors' layout so that transformers reads it back (model/io/compressed.py).

With int4 the token embedding and the head are int8, as llama.cpp's Q4 files keep it at 8 bits:
the head reads every token's logit from it, and 4 bits there cost more quality than they save bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lmkiln.errors import UserError
from lmkiln.io import check_output_dir, output_dir, write_json
from lmkiln.model import quant
from lmkiln.model.families import family_of
from lmkiln.model.io import compressed
from lmkiln.model.io.hub import copy_tokenizer_files, iter_checked_weights, read_args, read_config, tied_head
from lmkiln.model.io.quantized import EMBEDDING, quant_layouts, quantizable, stored_specs
from lmkiln.model.io.stream_safetensors import write_streamed


def weight_layout(name: str, shape, layout: str) -> str | None:
    """The layout a weight is written in: None (kept as it is: norms, biases) or int8/int4."""
    if not quantizable(name, shape):
        return None
    return "int8" if name in (f"{EMBEDDING}.weight", "lm_head.weight") else layout


def check_quantizable(model_dir: Path, layout: str):
    """The args of a dense decoder directory `layout` can hold, or a UserError before any work."""
    if layout not in quant.LAYOUTS:
        raise UserError(f"--quant {layout}: expected one of {', '.join(quant.LAYOUTS)}")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"'{model_dir}' is not a model directory (no config.json)")
    if quant_layouts(model_dir) is not None:
        raise UserError(f"{model_dir}: already quantized ({', '.join(quant_layouts(model_dir))})")
    args = read_args(model_dir)
    if family_of(args).kind != "decoder":
        raise UserError(f"{model_dir}: a {family_of(args).label(args.arch)}; kiln quantize takes decoders")
    if layout == "int4":
        for name, size in (("hidden_size", args.hidden_size), ("intermediate_size", args.intermediate_size)):
            if size % quant.GROUP:
                raise UserError(f"{model_dir}: {name} {size} does not divide into int4 groups of {quant.GROUP}")
    return args


def quantize_model(model_dir: str | Path, out: str | Path, layout: str, force: bool = False) -> dict[str, int]:
    """Write `model_dir` quantized into `out` (whole or not at all), in compressed-tensors' layout
    (model/io/compressed.py), which transformers reads too; {layout: matrices written so}."""
    model_dir, out = Path(model_dir), Path(out)
    args = check_quantizable(model_dir, layout)
    check_output_dir(out, [model_dir], force, "output directory")
    head = tied_head(args)  # written as a matrix of its own: see model/io/compressed.py
    specs, tensors, layouts = [], [], {}
    for _, read, tensor in iter_checked_weights(model_dir, args):  # one tensor read at a time
        for name in (read, head) if head and read == f"{EMBEDDING}.weight" else (read,):
            chosen = weight_layout(name, tensor.shape, layout)
            if chosen is None:
                specs += stored_specs(name, None, tensor.shape, torch.float32)
                tensors.append(tensor.float())
                continue
            layouts[chosen] = layouts.get(chosen, 0) + 1
            specs += compressed.stored_specs(name, chosen, tensor.shape)
            tensors += compressed.stored_tensors(chosen, quant.quantize_pieces(chosen, tensor))
    config = read_config(model_dir)
    config["quantization_config"] = compressed.quantization_config(layouts)
    config["torch_dtype"] = "float32"  # the activations'
    if head:
        config["tie_word_embeddings"] = False
    with output_dir(out, "kiln quantize") as tmp:
        write_streamed(tmp / "model.safetensors", specs, iter(tensors))
        write_json(tmp / "config.json", config)
        copy_tokenizer_files(model_dir, tmp)
        if (model_dir / "generation_config.json").is_file():
            shutil.copyfile(model_dir / "generation_config.json", tmp / "generation_config.json")
        write_json(tmp / "quantize.json", {"source": str(model_dir), "quant": layout, "layouts": layouts})
    return layouts


def quantize_and_report(model_dir: str | Path, out: str | Path, layout: str, force: bool = False) -> None:
    """`kiln quantize`: quantize, then print what was written and its size against the source's."""
    from lmkiln.log import console

    layouts = quantize_model(model_dir, out, layout, force)
    kinds = ", ".join(f"{n} {k}" for k, n in layouts.items())
    console.print(
        f"quantized {model_dir} -> {out}: {kinds} matrices; weights {_weight_mb(model_dir):,.1f} MB -> "
        f"{_weight_mb(out):,.1f} MB on disk"
    )


def _weight_mb(model_dir: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 1e6
