"""`kiln export`: a model directory (or a LoRA adapter on its base) out as a transformers directory in a
chosen dtype, or as GGUF with an Ollama Modelfile. Each export is checked: the written files are read
back and must generate the same greedy tokens (HF) or hold the same tensors and metadata (GGUF) as the
model in memory, plus the chat-template, end-of-turn and padding checks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmkiln.errors import UserError
from lmkiln.io import check_output_dir, output_dir, write_text
from lmkiln.model.convert.importer import parse_dtype
from lmkiln.model.families.transformer import Transformer
from lmkiln.model.inference.generate import generate
from lmkiln.model.io.checks import Check, consistency_checks, end_of_turn, require_same_format
from lmkiln.model.io.gguf_format import QUANTS
from lmkiln.model.io.hub import load_model, read_args, save_state
from lmkiln.model.io.quantized import load_quantized, quant_layouts, quantized_weights
from lmkiln.model.lora import LoRALinear, apply_lora, lora_state, merge_lora, peft_key

PROBE_PROMPT = [1, 5, 9, 14, 3, 7]  # token ids every vocabulary has
INTEGRITY_CHECKS = ("exported model generates", "GGUF read back")


def adapter_base(adapter_dir: Path, base: Path | None) -> tuple[dict, Path]:
    """(adapter_config.json, the base model's directory) of a PEFT adapter, checked."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("fan_in_fan_out"):
        raise UserError(f"{adapter_dir}: only LoRA and DoRA adapters can be merged (peft_type {cfg.get('peft_type')})")
    base = base or Path(cfg.get("base_model_name_or_path") or "")
    if not (base / "config.json").is_file():
        raise UserError(f"{adapter_dir}: base model '{base}' is not a model directory; give it with --base")
    return cfg, base


def merged_adapter(adapter_dir: Path, base: Path | None) -> tuple[Transformer, Path]:
    """The base model with a PEFT LoRA or DoRA adapter folded in, and the base's directory."""
    cfg, base = adapter_base(adapter_dir, base)
    model = load_model(base)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    targets = sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in weights})
    apply_lora(model, targets, cfg["r"], cfg["lora_alpha"], 0.0, bool(cfg.get("use_dora")))
    ours = {peft_key(key): key for key in lora_state(model)}
    unknown = sorted(set(weights) - set(ours))
    if unknown:
        raise UserError(f"{adapter_dir}: adapter weight '{unknown[0]}' has no layer in the base model {base}")
    if cfg.get("use_rslora"):
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.scaling = cfg["lora_alpha"] / cfg["r"] ** 0.5
    model.load_state_dict({ours[key]: value.float() for key, value in weights.items()}, strict=False)
    merge_lora(model)
    return model, base


def _rounded(model: Transformer, dtype: torch.dtype) -> Transformer:
    """The model with its weights rounded to `dtype` (and back to fp32 to run): what the export holds."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


def export_model(
    model_path: Path,
    out: Path,
    merge: bool = False,
    base: Path | None = None,
    fmt: str = "hf",
    dtype: str | None = None,
    force: bool = False,
    quant: str | None = None,
) -> list[Check]:
    """Export `model_path` (or an adapter merged into its base) into `out`, written whole or not at all,
    never over an input nor over files lmkiln did not write unless `force`; returns the checks."""
    model_path, out = Path(model_path), Path(out)
    is_adapter = (model_path / "adapter_config.json").is_file()
    if not is_adapter and not (model_path / "config.json").is_file():
        raise UserError(
            f"'{model_path}' is neither a model directory (config.json) nor a LoRA adapter (adapter_config.json)"
        )
    if merge and not is_adapter:
        raise UserError(f"--merge needs a LoRA adapter directory; '{model_path}' has no adapter_config.json")
    if is_adapter and not merge:
        raise UserError(
            f"'{model_path}' is a LoRA adapter, already in PEFT's layout; add --merge to fold it into its base"
        )
    parse_dtype(dtype)
    if quant is not None and fmt != "gguf":
        raise UserError(f"--quant {quant}: quantization is for --format gguf")
    if quant is not None and quant not in QUANTS:
        raise UserError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
    inputs = [model_path] + ([adapter_base(model_path, base)[1]] if is_adapter else [])
    if not is_adapter and quant_layouts(model_path) is not None:
        if fmt != "gguf" or quant or dtype:
            raise UserError(
                f"{model_path}: quantized; `kiln export --format gguf` writes its own bits (int4 as Q4_1, int8 as "
                "Q8_0), with no --quant or --dtype; for anything else start from a dense copy"
            )
        check_output_dir(out, inputs, force, "output directory")
        with output_dir(out, "kiln export --format gguf") as tmp:
            return _export_quantized_gguf(model_path, tmp)
    check_output_dir(out, inputs, force, "output directory")
    if is_adapter:
        model, source = merged_adapter(model_path, base)
    else:
        model, source = load_model(model_path), model_path
    stored = json.loads((source / "config.json").read_text()).get("torch_dtype", "float32")
    target = parse_dtype(dtype) or parse_dtype(stored if stored in ("float32", "bfloat16", "float16") else "fp32")
    model = _rounded(model.eval(), target)
    with output_dir(out, f"kiln export --format {fmt}") as tmp:
        checks = (
            _export_gguf(model, source, tmp, target, quant) if fmt == "gguf" else _export_hf(model, source, tmp, target)
        )
        broken = [c for c in checks if c.status == "failed" and c.name in INTEGRITY_CHECKS]
        if broken:  # a bug of ours, not the user's: nothing is left behind, and the traceback says where
            raise RuntimeError(f"export of {model_path} failed its own check: {broken[0].name}: {broken[0].detail}")
    return checks


def _export_hf(model: Transformer, source: Path, out: Path, dtype: torch.dtype) -> list[Check]:
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    save_state(model.args, state, out, source)
    require_same_format(source, out)
    vocab_probe = [t % model.args.vocab_size for t in PROBE_PROMPT]
    expected = generate(model, vocab_probe, 16, temperature=0.0)
    got = generate(load_model(out), vocab_probe, 16, temperature=0.0)
    checks = [
        Check(
            "exported model generates",
            "ok" if got == expected else "failed",
            "the same 16 greedy tokens as the model in memory"
            if got == expected
            else f"different tokens: {got} against {expected}",
        )
    ]
    return checks + consistency_checks(out, fix=True)


def _export_gguf(
    model: Transformer, source: Path, out: Path, dtype: torch.dtype, quant: str | None = None
) -> list[Check]:
    from lmkiln.model.io.gguf_export import gguf_tensors, read_gguf, stored_values, write_gguf
    from lmkiln.model.io.gguf_format import gguf_package
    from lmkiln.model.io.gguf_import import gguf_model

    gguf = gguf_package()
    state = model.state_dict()
    path = out / "model.gguf"
    write_gguf(model.args, state, source, path, source.name, dtype, quant)
    meta, tensors = read_gguf(path)
    expected = gguf_tensors(model.args, state)
    bad = [
        n
        for n, t in expected.items()
        if n not in tensors or not torch.equal(tensors[n], stored_values(t, dtype, quant, gguf))
    ]
    stored = f"quantized {quant}" if quant else str(dtype).removeprefix("torch.")
    checks = [
        Check(
            "GGUF read back",
            "ok" if not bad and len(tensors) == len(expected) else "failed",
            f"{len(tensors)} tensors equal to the model's, {stored}, arch {meta['general.architecture']}"
            if not bad
            else f"tensors differ: {bad[:3]}",
        )
    ]
    # what the file's numbers do to the model's output: the same prompt through both
    probe = torch.tensor([[t % model.args.vocab_size for t in PROBE_PROMPT * 4]])
    size = f"{path.stat().st_size / 2**20:,.1f} MiB"
    try:
        with torch.no_grad():
            diff = (gguf_model(path)(probe) - model(probe)).abs().max().item()
        checks.append(
            Check(
                "GGUF logits",
                "ok",
                f"{size}; largest logit difference {diff:.2e} against the model in memory over {probe.shape[1]} tokens",
            )
        )
    except UserError as exc:  # a file lmkiln cannot read back as a model (Llama 3.1's rope_freqs)
        checks.append(Check("GGUF logits", "warning", f"{size}; not compared: {exc}"))
    if model.args.sliding_window and model.args.sliding_window < model.args.max_seq_len:
        checks.append(
            Check(
                "sliding window",
                "warning",
                f"llama.cpp's llama architecture has no sliding window: "
                f"contexts beyond {model.args.sliding_window} tokens differ",
            )
        )
    write_modelfile(source, out)
    return checks + consistency_checks(source)


def write_modelfile(source: Path, out: Path) -> None:
    """Ollama's Modelfile beside model.gguf, stopping at the source's end-of-turn token."""
    from lmkiln.model.io.gguf_export import modelfile

    eot = end_of_turn(source) if (source / "tokenizer_config.json").is_file() else None
    write_text(out / "Modelfile", modelfile("model.gguf", [eot[0]] if eot else []))


def _export_quantized_gguf(source: Path, out: Path) -> list[Check]:
    """A quantized directory as GGUF, block for block (model/io/gguf_export.py:quantized_blocks)."""
    from lmkiln.model import quant
    from lmkiln.model.io.gguf_export import gguf_tensors, quantized_blocks, read_gguf, write_gguf
    from lmkiln.model.io.gguf_format import gguf_package
    from lmkiln.model.io.gguf_import import gguf_model

    gguf = gguf_package()
    args = read_args(source)
    state, values = {}, {}  # what goes in; what it must read back as (the scales rounded to fp16)
    for name, layout, pieces in quantized_weights(source, args):
        if layout is None:
            state[name] = values[name] = pieces["weight"].float()
            continue
        state[name] = quantized_blocks(layout, pieces, gguf)
        halved = {k: v.half().float() if k in ("weight_scale", "weight_min") else v for k, v in pieces.items()}
        values[name] = quant.dequantize_pieces(layout, halved)
    path = out / "model.gguf"
    write_gguf(args, state, source, path, source.name, torch.float32)
    meta, tensors = read_gguf(path)
    expected = gguf_tensors(args, values)
    bad = [n for n, t in expected.items() if n not in tensors or not torch.equal(tensors[n], t)]
    kinds = sorted({b.qtype.name for b in state.values() if hasattr(b, "qtype")})
    checks = [
        Check(
            "GGUF read back",
            "ok" if not bad and len(tensors) == len(expected) else "failed",
            f"{len(tensors)} tensors equal to the model's ({', '.join(kinds)}: its own codes), arch "
            f"{meta['general.architecture']}"
            if not bad
            else f"tensors differ: {bad[:3]}",
        )
    ]
    probe = torch.tensor([[t % args.vocab_size for t in PROBE_PROMPT * 4]])
    with torch.no_grad():
        diff = (gguf_model(path)(probe) - load_quantized(source, args)(probe)).abs().max().item()
    checks.append(
        Check(
            "GGUF logits",
            "ok",
            f"{path.stat().st_size / 2**20:,.1f} MiB; largest logit difference {diff:.2e} against the quantized "
            f"model (its bf16 kernels) over {probe.shape[1]} tokens",
        )
    )
    write_modelfile(source, out)
    return checks + consistency_checks(source)


def export_and_report(model: Path, out: Path, **options) -> None:
    """`kiln export`: export (options as `export_model` takes them), then print the read-back checks."""
    from lmkiln.log import console
    from lmkiln.model.io.checks import print_checks

    checks = export_model(model, out, **options)
    console.print(f"exported {model} -> {out}\nchecks:")
    print_checks(checks)
