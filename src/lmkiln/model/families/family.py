"""A model family as one record: what it is called, what it reads and writes, how it is built, and what
trains it. Every question the rest of lmkiln asks of a model ("is it an encoder?", "which HF class is
its classifier?", "which weights may a checkpoint lack?") is a question to its `Family`, never a test of
an architecture string, so a new family is one file ending in its `Family(...)` plus one line in
`families/__init__.py`'s table."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

KINDS = ("decoder", "encoder", "seq2seq")
OBJECTIVES = ("causal", "mlm", "span")  # next-token prediction, masked-word prediction, span corruption


DIMS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")


def recipe_dims(presets: Mapping[str, Mapping[str, int]], model_cfg: Any) -> dict[str, int]:
    """A recipe's model dims: its preset's (tiny when none is named), with the dims it gives explicitly on
    top (only those the family's presets have, or the feed-forward width)."""
    dims = dict(presets[model_cfg.preset or "tiny"])
    for key in DIMS:
        value = getattr(model_cfg, key)
        if value is not None and (key in dims or key == "intermediate_size"):
            dims[key] = value
    return dims


def _same_name(name: str, args: Any) -> str:
    return name


def _never(name: str) -> bool:
    return False


@dataclass(frozen=True)
class Vocabulary:
    """The special tokens of a family's own vocabulary (its `tokenizer.kind`), which `kiln tokenizer` trains
    in: `specials` take ids 0, 1, ...; `sentinels` (span corruption's) are added at the top after training,
    the first the highest id; `single` / `pair` are the post-processor's templates ($A, $B) over
    `template_tokens`; `names` are tokenizer_config.json's *_token keys, `ids` what `special_ids` reports
    (bos, eos, pad, ...); a tokenizer holding `marker` has this vocabulary."""

    kind: str
    specials: tuple[str, ...]
    names: Mapping[str, str | None]
    ids: Mapping[str, str | None]
    marker: str
    sentinels: tuple[str, ...] = ()
    single: str | None = None
    pair: str | None = None
    template_tokens: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)  # a record is itself: compared and hashed by identity
class Family:
    """One architecture family. `from_hf(config, architecture, where)` reads config.json into the
    family's args (a ValueError or KeyError names a value it does not implement); `to_hf(args, dtype)` is
    the config.json it writes; `build(args)` the module; `from_recipe(model_cfg, vocab_size, ids)` the args a
    recipe's model section describes (None: the family is imported, never pretrained)."""

    name: str  # as messages and docs name it
    kind: str  # decoder | encoder | seq2seq
    args_type: type
    model_types: tuple[str, ...]  # config.json model_type values it reads and writes
    hf_classes: tuple[str, ...]  # config.json architectures it reads as a base model
    from_hf: Callable[[dict, str, str], Any]
    to_hf: Callable[[Any, torch.dtype], dict]
    build: Callable[[Any], nn.Module]
    tied_head: Callable[[Any], str | None]  # the output weight that is the embedding (not stored), if tied
    objective: str  # how it pretrains: causal | mlm | span
    describe: Callable[[Any], str]  # its shape in one line, after "<class>: N parameters, "
    archs: tuple[str, ...] = ()  # recipe model.arch values it pretrains
    from_recipe: Callable[[Any, int, dict], Any] | None = None
    presets: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # named sizes (model.preset)
    vocabulary: Vocabulary | None = None  # its own special tokens; None: lmkiln's chat and FIM tokens
    config_keys: tuple[str, ...] = ()  # recipe keys (section.key) only this family reads
    display: Mapping[str, str] = field(default_factory=dict)  # model_type: its name in messages (RoBERTa)
    weight_name: Callable[[str, Any], str] = _same_name  # a stored weight's name as the module has it
    skipped_weights: tuple[str, ...] = ()  # stored weights (substrings of the name) the module does not keep
    optional_weight: Callable[[str], bool] = _never  # a weight a checkpoint may lack (newly initialised)
    lora_targets: tuple[str, ...] = ()  # its projection names, where a decoder's mean nothing
    sequence_classifier: Mapping[str, str] = field(default_factory=dict)  # model_type: *ForSequenceClassification
    token_classifier: Mapping[str, str] = field(default_factory=dict)  # model_type: *ForTokenClassification
    # the args of the body a label head sits on: no masked-LM head or decoder; a decoder's head tied (unused)
    label_body: Callable[[Any], Any] = lambda args: args
    pooled_classifier: bool = False  # its sequence classifier can pool (`classifier_pooling`: cls or mean)
    sentencepiece_vocab: bool = False  # checkpoints ship spiece.model: import converts it to tokenizer.json
    start_token: str = "bos_token_id"  # the generation_config key its decoding starts from

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"family {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"family {self.name}: objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        object.__setattr__(self, "presets", MappingProxyType(dict(self.presets)))

    @property
    def tokenizer_kind(self) -> str:
        """The `tokenizer.kind` its vocabulary needs to pretrain."""
        return self.vocabulary.kind if self.vocabulary is not None else "decoder"

    @property
    def is_encoder(self) -> bool:
        return self.kind == "encoder"

    @property
    def is_seq2seq(self) -> bool:
        return self.kind == "seq2seq"

    @property
    def generates(self) -> bool:
        """Whether it writes text (a decoder or an encoder-decoder); an encoder reads text whole."""
        return self.kind != "encoder"

    def label(self, model_type: str) -> str:
        """The family's name for one of its model types, in messages (ModernBERT, RoBERTa)."""
        return self.display.get(model_type, self.name)
