"""Classic BERT (Devlin et al. 2019) and RoBERTa (Liu et al. 2019) encoders, read from transformers'
checkpoints for fine-tuning: learned absolute positions, post-norm LayerNorms with biases, GELU
feed-forward layers, biases everywhere. Module names equal transformers' `BertForMaskedLM` /
`RobertaForMaskedLM` (`BertModel`'s weights gain the `bert.` prefix as they load), so the state dict is
the checkpoint's. lmkiln pretrains ModernBERT (model/families/encoder.py); these are imported, tuned and served.

RoBERTa counts positions from `pad_token_id + 1`, as fairseq did; BERT from 0. Every token has segment
(token type) 0: lmkiln's tasks read one text at a time."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.model.families.encoder import EncoderBase, linear_head, positions_of, segment_mask
from lmkiln.model.families.family import Family
from lmkiln.model.families.transformer import hf_shape

# the classes a checkpoint may name; (family, has the masked-LM head)
BERT_CLASSES = {
    "BertForMaskedLM": ("bert", True),
    "BertForPreTraining": ("bert", True),  # the original checkpoints: the next-sentence head is dropped
    "BertModel": ("bert", False),
    "RobertaForMaskedLM": ("roberta", True),
    "RobertaModel": ("roberta", False),
}
IGNORED_BERT_WEIGHTS = (".embeddings.position_ids", ".embeddings.token_type_ids", "cls.seq_relationship.")


@dataclass
class BertArgs:
    vocab_size: int
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    arch: str = "bert"  # or "roberta"
    masked_lm: bool = True  # the checkpoint has the masked-LM head (a *Model checkpoint has not)
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_offset(self) -> int:
        return (self.pad_token_id or 0) + 1 if self.arch == "roberta" else 0

    @property
    def max_seq_len(self) -> int:
        return self.max_position_embeddings - self.position_offset

    def num_params(self) -> int:
        d, f = self.hidden_size, self.intermediate_size
        embed = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * d + 2 * d
        layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        head = d * d + 3 * d + self.vocab_size if self.masked_lm else 0
        return embed + self.num_layers * layer + d * d + d + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x the matrix parameters (embedding lookups excluded, the tied
        decoder's product included when there is one), plus attention over every key."""
        d = self.hidden_size
        matrices = self.num_layers * (4 * d * d + 2 * d * self.intermediate_size)
        if self.masked_lm:
            matrices += d * d + self.vocab_size * d
        return 6 * matrices + 12 * d * seq_len * self.num_layers


class _Embeddings(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.position_embeddings = nn.Embedding(a.max_position_embeddings, a.hidden_size)
        self.token_type_embeddings = nn.Embedding(a.type_vocab_size, a.hidden_size)
        self.LayerNorm = nn.LayerNorm(a.hidden_size, eps=a.norm_eps)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _Layer(nn.Module):
    """Post-norm: each sub-layer's output is added to its input, then normed."""

    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        d, f = a.hidden_size, a.intermediate_size
        self.a = a
        projections = {n: nn.Linear(d, d) for n in ("query", "key", "value")}
        self.attention = nn.ModuleDict(
            {
                "self": nn.ModuleDict(projections),
                "output": nn.ModuleDict({"dense": nn.Linear(d, d), "LayerNorm": nn.LayerNorm(d, eps=a.norm_eps)}),
            }
        )
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(d, f)})
        self.output = nn.ModuleDict({"dense": nn.Linear(f, d), "LayerNorm": nn.LayerNorm(d, eps=a.norm_eps)})

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        proj = self.attention["self"]
        q, k, v = (proj[n](x).view(b, t, self.a.num_heads, -1).transpose(1, 2) for n in ("query", "key", "value"))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, -1)
        out = self.attention["output"]
        x = out["LayerNorm"](x + out["dense"](attended))
        h = F.gelu(self.intermediate["dense"](x))
        return self.output["LayerNorm"](x + self.output["dense"](h))


class _Body(nn.Module):
    """transformers' BertModel / RobertaModel: embeddings, the layer stack, and the pooler (the [CLS]
    state through a tanh layer, which BertForSequenceClassification reads)."""

    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.embeddings = _Embeddings(a)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(_Layer(a) for _ in range(a.num_layers))})
        self.pooler = nn.ModuleDict({"dense": nn.Linear(a.hidden_size, a.hidden_size)})


class _MlmHead(nn.Module):
    """The masked-LM head: dense, GELU, LayerNorm, then the decoder (the token embedding) and its bias.
    BERT nests it as cls.predictions.transform.*; RoBERTa's lm_head holds it flat."""

    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        d = a.hidden_size
        if a.arch == "bert":
            self.transform = nn.ModuleDict({"dense": nn.Linear(d, d), "LayerNorm": nn.LayerNorm(d, eps=a.norm_eps)})
        else:
            self.dense, self.layer_norm = nn.Linear(d, d), nn.LayerNorm(d, eps=a.norm_eps)
        self.decoder = nn.Linear(d, a.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(a.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "transform"):
            return self.transform["LayerNorm"](F.gelu(self.transform["dense"](x)))
        return self.layer_norm(F.gelu(self.dense(x)))


class BertEncoder(EncoderBase):
    """BertForMaskedLM / RobertaForMaskedLM (or, without `masked_lm`, the bare BertModel / RobertaModel)."""

    LORA_TARGETS = ["query", "key", "value", "dense"]

    def __init__(self, args: BertArgs) -> None:
        super().__init__()
        self.args = args
        self.add_module(args.arch, _Body(args))
        if args.masked_lm:
            if args.arch == "bert":
                self.cls = nn.ModuleDict({"predictions": _MlmHead(args)})
            else:
                self.lm_head = _MlmHead(args)
        self.gradient_checkpointing = False
        self.after_load()

    @property
    def body(self) -> _Body:
        return getattr(self, self.args.arch)

    @property
    def mlm_head(self) -> _MlmHead | None:
        if not self.args.masked_lm:
            return None
        return self.cls["predictions"] if self.args.arch == "bert" else self.lm_head

    def after_load(self) -> None:
        if self.mlm_head is not None:
            self.mlm_head.decoder.weight = self.body.embeddings.word_embeddings.weight

    def hidden_states(self, ids: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        b, t = ids.shape
        pos = positions_of(segments, b, t, ids.device) + self.args.position_offset
        mask = segment_mask(segments)
        x = self.body.embeddings(ids, pos)
        for layer in self.body.encoder["layer"]:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        head = self._need_mlm_head()
        return head.decoder.weight, head.bias

    def _need_mlm_head(self) -> _MlmHead:
        if self.mlm_head is None:
            raise ValueError(f"this {self.args.arch} checkpoint has no masked-LM head (a base model)")
        return self.mlm_head

    def forward(
        self, ids: torch.Tensor, segments: torch.Tensor | None = None, hidden_only: bool = False
    ) -> torch.Tensor:
        head = self._need_mlm_head()
        out = head(self.hidden_states(ids, segments))
        return out if hidden_only else head.decoder(out) + head.bias

    # what a label head reads: BERT's classifier the pooler's tanh of [CLS]; RoBERTa's has its own
    # dense + tanh (in the classifier); a tagger reads the final states as they are
    def sequence_features(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body.pooler["dense"](pooled)) if self.args.arch == "bert" else pooled

    def token_features(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def feature_params(self, per_token: bool) -> list[nn.Parameter]:
        return list(self.body.pooler.parameters()) if self.args.arch == "bert" and not per_token else []

    def classifier_head(self, num_labels: int) -> nn.Module:
        if self.args.arch == "bert":
            return linear_head(self.args.hidden_size, num_labels)
        return _RobertaClassificationHead(self.args.hidden_size, num_labels)

    def backbone_state(self, per_token: bool) -> dict[str, torch.Tensor]:
        """The weights a *ForSequence/TokenClassification directory keeps of the backbone: no MLM head,
        and the pooler only where transformers' class has one (BERT's sequence classifier)."""
        keep_pooler = self.args.arch == "bert" and not per_token
        return {
            k: v
            for k, v in self.state_dict().items()
            if k.startswith(f"{self.args.arch}.") and (keep_pooler or ".pooler." not in k)
        }


class _RobertaClassificationHead(nn.Module):
    """RobertaForSequenceClassification's `classifier`: dense, tanh, then `out_proj` to the labels."""

    def __init__(self, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.dense, self.out_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, num_labels)
        for layer in (self.dense, self.out_proj):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(x)))


def bert_config(args: BertArgs, dtype: torch.dtype = torch.float32, architecture: str | None = None) -> dict:
    """config.json as transformers writes it for BERT or RoBERTa."""
    family = "Bert" if args.arch == "bert" else "Roberta"
    architecture = architecture or f"{family}{'ForMaskedLM' if args.masked_lm else 'Model'}"
    return {
        **hf_shape(args, architecture, args.arch),
        "max_position_embeddings": args.max_position_embeddings,
        "type_vocab_size": args.type_vocab_size,
        "layer_norm_eps": args.norm_eps,
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "pad_token_id": args.pad_token_id,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
        "tie_word_embeddings": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def bert_args_from_config(config: dict, architecture: str, where: str) -> BertArgs:
    """BertArgs from a BERT or RoBERTa config.json; a value lmkiln does not implement is refused by name."""
    family, masked_lm = BERT_CLASSES.get(architecture, (config.get("model_type"), True))
    for key, wanted in (
        ("hidden_act", "gelu"),
        ("position_embedding_type", "absolute"),
        ("is_decoder", False),
        ("add_cross_attention", False),
        ("tie_word_embeddings", True),
    ):
        if config.get(key, wanted) != wanted:
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported (expected {wanted!r})")
    if family == "roberta" and config.get("pad_token_id") is None:
        raise ValueError(f"{where}: a RoBERTa config needs pad_token_id (its positions count from it)")
    return BertArgs(
        vocab_size=config["vocab_size"],
        hidden_size=config.get("hidden_size", 768),
        intermediate_size=config.get("intermediate_size", 3072),
        num_layers=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 12),
        max_position_embeddings=config.get("max_position_embeddings", 512),
        type_vocab_size=config.get("type_vocab_size", 2),
        norm_eps=config.get("layer_norm_eps", 1e-12),
        pad_token_id=config.get("pad_token_id", 0),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        arch=family,
        masked_lm=masked_lm,
    )


def bert_weight_name(name: str, args: BertArgs) -> str:
    """A stored weight's name as the model has it: a base model's weights gain the family prefix (as
    transformers loads BertModel into BertForMaskedLM), and old checkpoints' LayerNorm gamma/beta become
    weight/bias; the decoder's bias is the head's `bias`."""
    if name.endswith("LayerNorm.gamma"):
        name = name[: -len("gamma")] + "weight"
    elif name.endswith("LayerNorm.beta"):
        name = name[: -len("beta")] + "bias"
    if name.startswith(("embeddings.", "encoder.", "pooler.")):
        name = f"{args.arch}.{name}"
    if name in ("cls.predictions.decoder.bias", "lm_head.decoder.bias"):  # one tensor, saved under either name
        name = name.replace("decoder.", "")
    return name


def _tied_head(args: BertArgs) -> str | None:
    if not args.masked_lm:
        return None
    return "cls.predictions.decoder.weight" if args.arch == "bert" else "lm_head.decoder.weight"


FAMILY = Family(
    name="BERT",
    kind="encoder",
    args_type=BertArgs,
    model_types=("bert", "roberta"),
    hf_classes=tuple(BERT_CLASSES),
    from_hf=lambda config, architecture, where: bert_args_from_config(config, architecture, where),
    to_hf=lambda args, dtype: bert_config(args, dtype),
    build=BertEncoder,
    tied_head=_tied_head,
    objective="mlm",
    describe=lambda args: (
        f"{args.num_layers} layers ({args.max_seq_len} positions), hidden {args.hidden_size}, "
        f"{args.num_heads} heads, vocab {args.vocab_size}"
    ),
    display={"bert": "BERT", "roberta": "RoBERTa"},
    weight_name=bert_weight_name,
    skipped_weights=IGNORED_BERT_WEIGHTS,
    # BERT's pooler: masked-LM checkpoints leave it out, a sequence classifier reads it (as transformers does)
    optional_weight=lambda name: ".pooler." in name,
    lora_targets=tuple(BertEncoder.LORA_TARGETS),
    label_body=lambda args: replace(args, masked_lm=False),  # a label head replaces the masked-LM one
    sequence_classifier={"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification"},
    token_classifier={"bert": "BertForTokenClassification", "roberta": "RobertaForTokenClassification"},
)
