"""A ModernBERT encoder (Warner et al. 2024): a bidirectional transformer with RoPE, pre-norm LayerNorms
without biases, GeGLU feed-forward layers, and attention that alternates between global layers (every
`global_every`-th, from the first) and local ones that see `local_attention // 2` tokens on each side.
Module names equal transformers' `ModernBertForMaskedLM`, so the state dict is its safetensors file.

Packed rows carry a segment id per token: attention stays within a segment and positions restart at
each one, so packed documents never see each other."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.model.families.family import Family, Vocabulary, recipe_dims
from lmkiln.model.families.transformer import hf_shape


@dataclass
class EncoderArgs:
    vocab_size: int
    hidden_size: int = 256
    intermediate_size: int = 384  # ModernBERT's 1.5 x hidden (1152 for 768)
    num_layers: int = 4
    num_heads: int = 4
    max_seq_len: int = 512
    norm_eps: float = 1e-5
    local_attention: int = 128  # the whole local window
    global_every: int = 3  # layer i attends globally when i % global_every == 0
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    pad_token_id: int | None = None
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    mask_token_id: int | None = None
    decoder_bias: bool = True
    arch: str = "modernbert"
    tie_embeddings: bool = True  # the decoder's weight is the token embedding, as in ModernBERT

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def is_global(self, layer: int) -> bool:
        return layer % self.global_every == 0

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = 3 * d * d + d * d + 2 * d * f + f * d + 2 * d
        return v * d + d + self.num_layers * per_layer + d + d * d + d + (v if self.decoder_bias else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x the matrix parameters, plus attention over the keys each layer sees."""
        # the tied embedding's matrix counts once, as the decoder's product; lookups and vectors do not
        matrices = self.num_params() - (self.vocab_size if self.decoder_bias else 0)
        keys = sum(
            seq_len if self.is_global(i) else min(seq_len, self.local_attention + 1) for i in range(self.num_layers)
        )
        return 6 * matrices + 12 * self.hidden_size * keys


class _Embeddings(nn.Module):
    def __init__(self, a: EncoderArgs) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.norm = nn.LayerNorm(a.hidden_size, eps=a.norm_eps, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tok_embeddings(ids))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Attention(nn.Module):
    def __init__(self, a: EncoderArgs) -> None:
        super().__init__()
        self.a = a
        self.Wqkv = nn.Linear(a.hidden_size, 3 * a.hidden_size, bias=False)
        self.Wo = nn.Linear(a.hidden_size, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.Wqkv(x).view(b, t, 3, self.a.num_heads, self.a.head_dim).permute(2, 0, 3, 1, 4)
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.Wo(out.transpose(1, 2).reshape(b, t, -1))


class _Mlp(nn.Module):
    """GeGLU: the input half through GELU, gated by the other half."""

    def __init__(self, a: EncoderArgs) -> None:
        super().__init__()
        self.Wi = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)
        self.Wo = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(F.gelu(inp) * gate)


class _Layer(nn.Module):
    def __init__(self, a: EncoderArgs, index: int) -> None:
        super().__init__()
        # the first layer's input is the normed embedding already
        self.attn_norm = nn.Identity() if index == 0 else nn.LayerNorm(a.hidden_size, eps=a.norm_eps, bias=False)
        self.attn = _Attention(a)
        self.mlp_norm = nn.LayerNorm(a.hidden_size, eps=a.norm_eps, bias=False)
        self.mlp = _Mlp(a)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class _Body(nn.Module):
    def __init__(self, a: EncoderArgs) -> None:
        super().__init__()
        self.embeddings = _Embeddings(a)
        self.layers = nn.ModuleList(_Layer(a, i) for i in range(a.num_layers))
        self.final_norm = nn.LayerNorm(a.hidden_size, eps=a.norm_eps, bias=False)


class _Head(nn.Module):
    def __init__(self, a: EncoderArgs) -> None:
        super().__init__()
        self.dense = nn.Linear(a.hidden_size, a.hidden_size, bias=False)
        self.norm = nn.LayerNorm(a.hidden_size, eps=a.norm_eps, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


def positions_of(segments: torch.Tensor | None, b: int, t: int, device) -> torch.Tensor:
    """Each token's position: from 0 in the row, or, with segment ids, from 0 in its segment."""
    pos = torch.arange(t, device=device).expand(b, t)
    if segments is None:
        return pos
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(start, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return pos - first


def segment_mask(segments: torch.Tensor | None) -> torch.Tensor | None:
    """(B, 1, T, T) boolean mask, True where a query and key share a segment; None (all) without segments."""
    return None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]


def attention_masks(
    a: EncoderArgs, segments: torch.Tensor | None, t: int, device
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(global, local) boolean masks, True where a query may attend: the same segment, and for local
    layers within local_attention // 2 tokens. Without segments the global mask is None (all of it)."""
    idx = torch.arange(t, device=device)
    near = (idx[:, None] - idx[None, :]).abs() <= a.local_attention // 2
    same = segment_mask(segments)
    return (None, near) if same is None else (same, same & near)


def linear_head(hidden: int, num_labels: int) -> nn.Linear:
    """A label classifier, initialised as transformers does (normal 0.02, zero bias)."""
    layer = nn.Linear(hidden, num_labels)
    nn.init.normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


class EncoderBase(nn.Module):
    """What every encoder (ModernBERT here, BERT and RoBERTa in model/families/bert.py) offers the label heads,
    serving and the masked-LM loss. The defaults are ModernBERT's: its prediction head feeds the labels."""

    LORA_TARGETS: list[str] = []
    args: EncoderArgs
    head: nn.Module

    def hidden_states(self, ids: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def padded_states(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states of right-padded rows, and the mask of real tokens: the padding is a segment
        of its own, so no real token sees it and a row's states are those it has alone."""
        real = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
        return self.hidden_states(ids, segments=(~real).long()), real

    def sequence_features(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled)

    def token_features(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def feature_params(self, per_token: bool) -> list[nn.Parameter]:
        """The parameters between the backbone and a label head's classifier, which always train."""
        return list(self.head.parameters())

    def classifier_head(self, num_labels: int) -> nn.Module:
        return linear_head(self.args.hidden_size, num_labels)

    def backbone_state(self, per_token: bool) -> dict[str, torch.Tensor]:
        """The weights a *ForSequence/TokenClassification directory keeps of the backbone (no decoder)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("decoder.")}


class Encoder(EncoderBase):
    """ModernBertForMaskedLM: `forward(ids)` gives logits over the vocabulary at every position;
    `hidden_only=True` gives the prediction head's output, for a loss that runs the decoder itself."""

    LORA_TARGETS = ["Wqkv", "Wo", "Wi"]  # attention's and the feed-forward's projections

    def __init__(self, args: EncoderArgs) -> None:
        super().__init__()
        self.args = args
        self.model = _Body(args)
        self.head = _Head(args)
        self.decoder = nn.Linear(args.hidden_size, args.vocab_size, bias=args.decoder_bias)
        self.gradient_checkpointing = False
        self.after_load()

    def after_load(self) -> None:
        """The decoder tied to the embedding, and RoPE's inverse frequencies, one set per attention kind
        (computed, never stored): again after a load on the meta device."""
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight
        a = self.args
        for name, theta in (("global", a.global_rope_theta), ("local", a.local_rope_theta)):
            inv = 1.0 / theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32) / a.head_dim)
            self.register_buffer(f"{name}_inv_freq", inv, persistent=False)

    def init_weights(self, generator: torch.Generator) -> None:
        """Normal(0, 0.02) matrices, the output projections scaled down by depth (as GPT-2 does)."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.args.num_layers) if name.endswith(".Wo.weight") else 0.02
                with torch.no_grad():
                    p.normal_(0.0, std, generator=generator)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def _rope(self, pos: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim)
        return emb.cos(), emb.sin()

    def hidden_states(self, ids: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> the final normed hidden states (B, T, hidden)."""
        b, t = ids.shape
        pos = positions_of(segments, b, t, ids.device)
        ropes = {True: self._rope(pos, self.global_inv_freq), False: self._rope(pos, self.local_inv_freq)}
        full, near = attention_masks(self.args, segments, t, ids.device)
        x = self.model.embeddings(ids)
        for i, layer in enumerate(self.model.layers):
            glob = self.args.is_global(i)
            cos, sin = ropes[glob]
            args = (x, cos, sin, full if glob else near)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return self.model.final_norm(x)

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's weight and bias, for a loss that runs them on the masked positions alone."""
        return self.decoder.weight, self.decoder.bias

    def forward(
        self, ids: torch.Tensor, segments: torch.Tensor | None = None, hidden_only: bool = False
    ) -> torch.Tensor:
        out = self.head(self.hidden_states(ids, segments))
        return out if hidden_only else self.decoder(out)


def encoder_config(args: EncoderArgs, dtype: torch.dtype = torch.float32) -> dict:
    """config.json as transformers writes it for ModernBertForMaskedLM (read by transformers 4.48+ and 5)."""
    types = ["full_attention" if args.is_global(i) else "sliding_attention" for i in range(args.num_layers)]
    return {
        **hf_shape(args, "ModernBertForMaskedLM", "modernbert"),
        "max_position_embeddings": args.max_seq_len,
        "norm_eps": args.norm_eps,
        "norm_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "classifier_bias": False,
        "decoder_bias": args.decoder_bias,
        "hidden_activation": "gelu",
        "classifier_activation": "gelu",
        "local_attention": args.local_attention,
        "global_attn_every_n_layers": args.global_every,
        "layer_types": types,
        "global_rope_theta": args.global_rope_theta,
        "local_rope_theta": args.local_rope_theta,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": args.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": args.local_rope_theta},
        },
        "pad_token_id": args.pad_token_id,
        "bos_token_id": args.cls_token_id,
        "eos_token_id": args.sep_token_id,
        "cls_token_id": args.cls_token_id,
        "sep_token_id": args.sep_token_id,
        "tie_word_embeddings": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def encoder_args_from_config(config: dict, where: str) -> EncoderArgs:
    """EncoderArgs from a ModernBERT config.json; a value lmkiln does not implement is refused by name."""
    for key, wanted in (
        ("norm_bias", False),
        ("attention_bias", False),
        ("mlp_bias", False),
        ("classifier_bias", False),
    ):
        if config.get(key, wanted) != wanted:
            raise ValueError(f"{where}: {key}={config[key]} is not supported (ModernBERT has no biases there)")
    for key in ("hidden_activation", "classifier_activation"):
        if config.get(key, "gelu") != "gelu":
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported (expected 'gelu')")
    if not config.get("tie_word_embeddings", True):
        raise ValueError(f"{where}: tie_word_embeddings=false is not supported (the decoder is the embedding)")
    rope = config.get("rope_parameters") or {}
    for kind in ("full_attention", "sliding_attention"):
        if (rope.get(kind) or {}).get("rope_type", "default") != "default":
            raise ValueError(f"{where}: rope_type {rope[kind]['rope_type']!r} for {kind} is not supported")
    every = config.get("global_attn_every_n_layers", 3)
    types = config.get("layer_types")
    n = config.get("num_hidden_layers", 22)
    if types is not None and types != ["full_attention" if i % every == 0 else "sliding_attention" for i in range(n)]:
        raise ValueError(f"{where}: layer_types other than a global layer every {every} are not supported")
    return EncoderArgs(
        vocab_size=config["vocab_size"],
        hidden_size=config.get("hidden_size", 768),
        intermediate_size=config.get("intermediate_size", 1152),
        num_layers=n,
        num_heads=config.get("num_attention_heads", 12),
        max_seq_len=config.get("max_position_embeddings", 8192),
        norm_eps=config.get("norm_eps", 1e-5),
        local_attention=config.get("local_attention", 128),
        global_every=every,
        global_rope_theta=(rope.get("full_attention") or {}).get(
            "rope_theta", config.get("global_rope_theta", 160_000.0)
        ),
        local_rope_theta=(rope.get("sliding_attention") or {}).get(
            "rope_theta", config.get("local_rope_theta", 10_000.0)
        ),
        pad_token_id=config.get("pad_token_id"),
        cls_token_id=config.get("cls_token_id", config.get("bos_token_id")),
        sep_token_id=config.get("sep_token_id", config.get("eos_token_id")),
        decoder_bias=config.get("decoder_bias", True),
    )


# ModernBERT's sizes: the decoder presets' width, depth and heads; the feed-forward 1.5 x hidden (ModernBERT's
# ratio, which also follows an explicit hidden_size unless intermediate_size is given)
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=384),
    "mini": dict(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=576),
    "small": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=1152),
    "medium": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=1536),
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=32, intermediate_size=3072),
}


def build_encoder_args(model_cfg, vocab_size: int, special: dict[str, int | None]) -> EncoderArgs:
    """EncoderArgs from the recipe's model section: the preset's width, depth and heads, ModernBERT's
    feed-forward ratio (1.5 x hidden) unless intermediate_size is given, explicit dims on top."""
    dims = recipe_dims(PRESETS, model_cfg)
    if model_cfg.intermediate_size is None:
        dims["intermediate_size"] = dims["hidden_size"] * 3 // 2
    if dims["hidden_size"] % dims["num_heads"] or (dims["hidden_size"] // dims["num_heads"]) % 2:
        raise ValueError(f"hidden_size {dims['hidden_size']} must split into num_heads {dims['num_heads']} even heads")
    return EncoderArgs(
        vocab_size=vocab_size,
        max_seq_len=model_cfg.max_seq_len,
        norm_eps=model_cfg.norm_eps,
        local_attention=model_cfg.local_attention,
        global_every=model_cfg.global_every,
        pad_token_id=special.get("pad"),
        cls_token_id=special.get("cls"),
        sep_token_id=special.get("sep"),
        mask_token_id=special.get("mask"),
        **dims,
    )


class EncoderClassifier(nn.Module):
    """*ForSequenceClassification: the [CLS] token's (or the mean) final hidden state through what the
    family puts before its classifier (ModernBERT's prediction head, BERT's pooler) and the classifier.
    Padding is a segment of its own, so no real token sees it."""

    per_token = False

    def __init__(self, body: EncoderBase, num_labels: int, pooling: str = "cls") -> None:
        super().__init__()
        self.body, self.pooling = body, pooling
        self.classifier = body.classifier_head(num_labels)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden, real = self.body.padded_states(ids, lengths)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = (hidden * real[..., None]).sum(1) / lengths[:, None]
        return self.classifier(self.body.sequence_features(pooled))


def pad_rows(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids as one right-padded (B, T) tensor, and each row's length."""
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, lengths


@torch.no_grad()
def mean_embeddings(model: EncoderBase, rows: list[list[int]]) -> torch.Tensor:
    """Each row's final hidden states averaged over its tokens, unit length (as OpenAI's embeddings are);
    rows are padded together, the padding a segment of its own."""
    device = next(model.parameters()).device
    ids, lengths = (t.to(device) for t in pad_rows(rows))
    hidden, real = model.padded_states(ids, lengths)
    pooled = (hidden * real[..., None]).sum(1) / lengths[:, None]
    return F.normalize(pooled.float(), dim=-1)


class EncoderTagger(nn.Module):
    """*ForTokenClassification: each token's final hidden state (through ModernBERT's prediction head)
    and a linear classifier; padding is a segment of its own."""

    per_token = True

    def __init__(self, body: EncoderBase, num_labels: int) -> None:
        super().__init__()
        self.body = body
        self.classifier = linear_head(body.args.hidden_size, num_labels)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body.token_features(self.body.padded_states(ids, lengths)[0]))


def _modernbert_args(config: dict, architecture: str, where: str) -> EncoderArgs:
    return encoder_args_from_config(config, where)


FAMILY = Family(
    name="ModernBERT",
    kind="encoder",
    args_type=EncoderArgs,
    model_types=("modernbert",),
    hf_classes=("ModernBertForMaskedLM",),
    from_hf=_modernbert_args,
    to_hf=encoder_config,
    build=Encoder,
    tied_head=lambda args: "decoder.weight" if args.tie_embeddings else None,
    objective="mlm",
    describe=lambda args: (
        f"{args.num_layers} layers (global attention every {args.global_every}, local window "
        f"{args.local_attention}), hidden {args.hidden_size}, {args.num_heads} heads, vocab {args.vocab_size}"
    ),
    archs=("modernbert",),
    from_recipe=build_encoder_args,
    presets=PRESETS,
    vocabulary=Vocabulary(
        kind="encoder",
        specials=("[CLS]", "[SEP]", "[MASK]", "[PAD]"),
        names={"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]", "pad_token": "[PAD]"},
        ids={"bos": "[CLS]", "eos": "[SEP]", "pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
        marker="[MASK]",
        single="[CLS] $A [SEP]",  # BERT's pair layout: token type ids 0 then 1
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        template_tokens=("[CLS]", "[SEP]"),
    ),
    config_keys=("model.local_attention", "model.global_every", "pretrain.mask_rate", "pretrain.whole_word_mask"),
    lora_targets=tuple(Encoder.LORA_TARGETS),
    label_body=lambda args: replace(args, decoder_bias=False),  # a classifier keeps no decoder
    sequence_classifier={"modernbert": "ModernBertForSequenceClassification"},
    pooled_classifier=True,
    token_classifier={"modernbert": "ModernBertForTokenClassification"},
)
