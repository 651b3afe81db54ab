"""`kiln import`: an open model (Llama 2/3/3.1/3.2, Qwen2/2.5, Qwen3, Mistral, SmolLM2, TinyLlama) from a
Hugging Face directory on disk, or a hub id where a network exists, into an lmkiln model directory.

Everything is validated first: the architecture and every config value lmkiln does not implement are
refused by name, never approximated; each weight is checked against config.json by name and shape.
Weights are streamed tensor by tensor into output shards of at most `max_shard_bytes`, so importing
takes about one shard of memory, not the model's size. The result is again an HF directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmkiln.errors import UserError
from lmkiln.io import atomic_dir, write_json
from lmkiln.model.checks import Check, consistency_checks
from lmkiln.model.hub import hf_config, iter_checked_weights, read_args

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r} is not one of fp32, bf16, fp16")
    return DTYPES[name]


def resolve_source(source: str) -> Path:
    """A model directory on disk, or a hub id downloaded into the HF cache (needs huggingface_hub and a
    network)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or source.count("/") != 1:
        raise UserError(f"'{source}' is neither a model directory nor a Hugging Face hub id (OWNER/NAME)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"'{source}' is not a directory; to download it from the hub: pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]))
    except Exception as exc:  # offline, unknown repo, gated repo: the hub raises many types
        raise UserError(f"'{source}': cannot download it from the Hugging Face hub ({type(exc).__name__}: {exc})") from None


class ShardedWriter:
    """Collects tensors into safetensors shards of at most `max_bytes`, named as transformers names them."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.max_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.current, self.out / name, metadata={"format": "pt"})
        self.files.append((name, list(self.current)))
        self.current, self.size = {}, 0

    def close(self) -> None:
        if self.current:
            self._flush()
        if len(self.files) == 1:
            (self.out / self.files[0][0]).rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, (name, keys) in enumerate(self.files, 1):
            final = f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            (self.out / name).rename(self.out / final)
            weight_map.update({k: final for k in keys})
        write_json(self.out / "model.safetensors.index.json",
                   {"metadata": {"total_size": self.total}, "weight_map": weight_map})


def import_model(source: str, out: str | Path, dtype: str | None = None,
                 max_shard_bytes: int = 1 << 30) -> list[Check]:
    """Import `source` into `out` (written whole or not at all); returns the consistency checks."""
    src = resolve_source(source)
    args = read_args(src)
    target = parse_dtype(dtype)
    out = Path(out)
    with atomic_dir(out) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes)
        stored = None
        for _, name, tensor in iter_checked_weights(src, args):
            tensor = tensor.to(target) if target is not None else tensor
            stored = stored or tensor.dtype
            writer.add(name, tensor)
        writer.close()
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        write_json(tmp / "config.json", hf_config(args, stored or torch.float32))
        if not (tmp / "generation_config.json").is_file():
            write_json(tmp / "generation_config.json", {"bos_token_id": args.bos_token_id,
                                                        "eos_token_id": args.eos_token_id,
                                                        "pad_token_id": args.pad_token_id})
        checks = consistency_checks(tmp, fix=True)
        write_json(tmp / "import.json", {"source": str(source), "resolved": str(src),
                                         "checks": [c.__dict__ for c in checks]})
    return checks


def describe(model_dir: Path) -> str:
    args = read_args(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    scaling = f", rope scaling {args.rope_scaling['rope_type']}" if args.rope_scaling else ""
    return (f"{cfg['architectures'][0]}: {args.num_params() / 1e6:,.1f}M parameters, {args.num_layers} layers, "
            f"hidden {args.hidden_size}, {args.num_heads} heads ({args.num_kv_heads} kv), vocab {args.vocab_size}"
            f"{scaling}, {cfg.get('torch_dtype')}")
