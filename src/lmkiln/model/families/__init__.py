"""The architecture families lmkiln builds, reads and writes: one `Family` record each (families/family.py),
listed in `FAMILIES`. `family_of` finds the family of an args object or a config.json dict,
`family_of_arch` the one a recipe's `model.arch` names. Adding a family: docs/architecture.md."""

from __future__ import annotations

from typing import Any

from lmkiln.errors import UserError
from lmkiln.model.families import bert, encoder, t5, transformer
from lmkiln.model.families.family import Family

FAMILIES: tuple[Family, ...] = (
    transformer.FAMILY,  # Llama, Qwen2, Qwen3, Mistral
    encoder.FAMILY,  # ModernBERT
    bert.FAMILY,  # BERT, RoBERTa
    t5.FAMILY,  # T5, T5 v1.1, Flan-T5, mT5
)

ARCHS: tuple[str, ...] = tuple(a for f in FAMILIES for a in f.archs)  # what `model.arch` may name
VOCABULARIES = {f.vocabulary.kind: f.vocabulary for f in FAMILIES if f.vocabulary is not None}
TOKENIZER_KINDS: tuple[str, ...] = ("decoder", *VOCABULARIES)  # decoder: lmkiln's chat and FIM tokens
_BY_TYPE = {m: f for f in FAMILIES for m in f.model_types}
_BY_CLASS = {c: f for f in FAMILIES for c in f.hf_classes}
_BY_ARGS = {f.args_type: f for f in FAMILIES}
_BY_ARCH = {a: f for f in FAMILIES for a in f.archs}


def family_of(what: Any) -> Family:
    """The family of an args object or a config.json dict (of a model directory: `hub.family_of_dir`)."""
    if isinstance(what, dict):
        return family_of_config(what)
    try:
        return _BY_ARGS[type(what)]
    except KeyError:
        raise TypeError(f"{type(what).__name__} is not the args of a model family") from None


def family_of_config(config: dict) -> Family:
    """The family a config.json describes, by its model_type (any head: masked LM, label heads, base)."""
    family = _BY_TYPE.get(config.get("model_type"))
    if family is None:
        raise UserError(f"model_type {config.get('model_type')!r} is not supported (supported: {', '.join(_BY_TYPE)})")
    return family


def base_family(config: dict, where: str) -> tuple[Family, str]:
    """The family and architecture class of a base model's config.json (the class it names, or its
    model_type's first when it names none); a class no family reads is a UserError listing those that are."""
    named = config.get("architectures")
    family = _BY_CLASS.get(named[0]) if named else _BY_TYPE.get(config.get("model_type"))
    if family is None:
        cls = named[0] if named else f"model_type {config.get('model_type')!r}"
        raise UserError(f"{where}: architecture '{cls}' is not supported (supported: {', '.join(sorted(_BY_CLASS))})")
    return family, named[0] if named else family.hf_classes[0]


def family_of_arch(arch: str) -> Family:
    """The family that pretrains a recipe's `model.arch`."""
    if arch not in _BY_ARCH:
        raise UserError(f"bad value for 'model.arch': {arch!r} (expected one of {', '.join(ARCHS)})")
    return _BY_ARCH[arch]


def _kind_of(config: dict) -> str | None:
    family = _BY_TYPE.get(config.get("model_type"))
    return family.kind if family is not None else None


def is_encoder_config(config: dict) -> bool:
    """Whether a config.json describes an encoder (of any head: masked LM, sequence or token labels); a
    model type no family reads is not one (no error: the caller's own load names it)."""
    return _kind_of(config) == "encoder"


def is_seq2seq_config(config: dict) -> bool:
    return _kind_of(config) == "seq2seq"


def presets_table() -> str:
    """The named sizes of every family that pretrains, as the Markdown table docs/recipes.md shows."""
    keys = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
    rows = ["| family (`model.arch`) | preset | " + " | ".join(f"`{k}`" for k in keys) + " |"]
    rows.append("|" + "---|" * (len(keys) + 2))
    for family in FAMILIES:
        for name, dims in family.presets.items():
            cells = [str(dims.get(k, "—")) for k in keys]
            rows.append(f"| {family.name} ({', '.join(family.archs)}) | `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)
