"""The one way to load a model directory for inference: the model, its tokenizer and its own format
(chat template; bos, eos, pad and stop ids: model/io/chat_format.py). Every verb that runs a model
(generate, chat, serve, eval, fine-tuning's base) goes through it, so none of them can fall back to
lmkiln's own special tokens for a model that has others."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmkiln.errors import UserError
from lmkiln.model.families import family_of
from lmkiln.model.families.transformer import Transformer
from lmkiln.model.inference.memory import release_freed_memory
from lmkiln.model.io.chat_format import ChatFormat
from lmkiln.model.io.hub import load_model, read_args
from lmkiln.model.io.quantized import load_quantized, quant_layouts


@dataclass
class Loaded:
    dir: Path
    model: Transformer
    tok: Tokenizer
    chat: ChatFormat


def check_model_dir(path: str | Path, what: str = "model") -> None:
    """A model directory (config.json in it), or a one-line UserError before anything loads."""
    if not (Path(path) / "config.json").is_file():
        hint = " (it does not exist)" if not Path(path).exists() else " (no config.json)"
        raise UserError(f"{what} '{path}' is not a model directory{hint}")


def load_format(model_dir: str | Path) -> tuple[Tokenizer, ChatFormat]:
    """A model directory's tokenizer and format, without its weights."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(
            f"{model_dir}: no tokenizer.json (a model directory carries its tokenizer; `kiln import` writes one)"
        )
    return Tokenizer.from_file(str(path)), ChatFormat(model_dir)


def load_for_inference(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Loaded:
    """A decoder, its tokenizer and chat format, for generation."""
    model_dir = Path(model_dir)
    args = read_args(model_dir)
    family = family_of(args)
    if family.is_seq2seq:
        raise UserError(
            f"{model_dir}: a {family.label(args.arch)} encoder-decoder: `kiln generate` and `kiln eval` run it; chat "
            "and serving run decoders and encoders only so far"
        )
    if family.is_encoder:
        raise UserError(
            f"{model_dir}: an encoder ({family.label(args.arch)}) does not generate; `kiln serve` offers it "
            "/v1/embeddings and /v1/classify"
        )
    tok, chat = load_format(model_dir)
    if quant_layouts(model_dir) is not None:  # kept quantized: its own dtypes, whatever `dtype` asks
        model = load_quantized(model_dir, args, device)
    else:
        model = load_model(model_dir, device, dtype).eval()
    release_freed_memory()
    return Loaded(model_dir, model, tok, chat)
