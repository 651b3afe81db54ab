"""T5 (Raffel et al. 2020), the encoder-decoder, as T5 v1.1, Flan-T5 and mT5 define it (and the original
T5 when a checkpoint asks): RMS-normed pre-norm sub-layers without biases, a gated GELU feed-forward
(ReLU in the original), and no position embeddings: each attention adds a learned bias per head and per
*bucket* of the key's offset from the query, exact for near offsets and logarithmic out to
`relative_attention_max_distance`. The first layer of each stack owns the bias table; every layer of
that stack reuses its values. The decoder's cross-attention has none. Attention logits are not scaled by
1/sqrt(d_kv) (T5 folds that into its initialisation).

Module names equal transformers' `T5ForConditionalGeneration`, so the state dict is its safetensors file.
In the original T5 the head is the shared embedding and the decoder's output is scaled by
d_model ** -0.5 first; v1.1 and later checkpoints have their own `lm_head` and no scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.model.families.family import Family, Vocabulary, recipe_dims

T5_CLASSES = {"T5ForConditionalGeneration": "t5", "MT5ForConditionalGeneration": "mt5"}
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
# stored weights the model does not keep: the stacks' copies of the shared embedding, and a bias table
# old checkpoints carried for the cross-attention, which has none
IGNORED_T5_WEIGHTS = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)


@dataclass
class T5Args:
    vocab_size: int
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_decoder_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    norm_eps: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # or "relu" (original T5), "gated-silu", ...
    tie_embeddings: bool = False  # the head is the shared embedding (the original T5; transformers 5's default)
    scale_decoder_outputs: bool = False  # the original T5: the decoder's output times d_model ** -0.5
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    max_seq_len: int = 512  # what the tokenizer and data pipeline cut to; positions are relative
    arch: str = "t5"  # model_type: t5 or mt5

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # transformers' rule: "gated-gelu" means the tanh approximation (gelu_new)
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_layers_total(self) -> int:
        return self.num_layers + self.num_decoder_layers

    def num_params(self) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in T5(self).parameters())

    def flops_per_token(self, seq_len: int, targets_len: int | None = None) -> float:
        """Training FLOPs per input token (6 x matrix parameters x the tokens each stack runs on, plus
        attention over the keys each layer sees), for `seq_len` inputs and `targets_len` targets."""
        t = targets_len if targets_len is not None else seq_len
        d, inner, mats = self.d_model, self.num_heads * self.d_kv, 3 if self.gated else 2
        ff = mats * d * self.d_ff
        encoder = self.num_layers * (4 * d * inner + ff) * seq_len
        cross_kv = self.num_decoder_layers * 2 * d * inner * seq_len  # keys and values of the encoder's output
        decoder = (self.num_decoder_layers * (6 * d * inner + ff) + d * self.vocab_size) * t
        attention = 2 * inner * (self.num_layers * seq_len**2 + self.num_decoder_layers * (t * t + t * seq_len))
        return (6 * (encoder + cross_kv + decoder) + 6 * attention) / seq_len


def relative_buckets(offset: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each key-minus-query offset: half the buckets (per direction, when bidirectional)
    are exact offsets 0, 1, 2, ...; the rest grow logarithmically up to max_distance, beyond which all
    offsets share the last bucket. A decoder sees no future, so only offsets <= 0 are bucketed there."""
    bucket = torch.zeros_like(offset)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (offset > 0).long() * num_buckets
        distance = offset.abs()
    else:
        distance = (-offset).clamp(min=0)
    exact = num_buckets // 2
    scaled = (
        exact
        + (
            torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (num_buckets - exact)
        ).long()
    )
    return bucket + torch.where(distance < exact, distance, scaled.clamp(max=num_buckets - 1))


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtracted, no bias; the variance in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused kernel, the same sums
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


class Attention(nn.Module):
    def __init__(self, a: T5Args, has_bias_table: bool = False) -> None:
        super().__init__()
        inner = a.num_heads * a.d_kv
        self.a = a
        self.q, self.k, self.v = (nn.Linear(a.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, a.d_model, bias=False)
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(a.relative_attention_num_buckets, a.num_heads)

    def position_bias(self, queries: int, keys: int, bidirectional: bool, device) -> torch.Tensor:
        """(1, heads, queries, keys) learned bias of each query-key offset's bucket."""
        offset = torch.arange(keys, device=device)[None, :] - torch.arange(queries, device=device)[:, None]
        a = self.a
        buckets = relative_buckets(
            offset, bidirectional, a.relative_attention_num_buckets, a.relative_attention_max_distance
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, memory: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        source = x if memory is None else memory
        q = self.q(x).view(b, t, self.a.num_heads, self.a.d_kv).transpose(1, 2)
        k, v = (p(source).view(b, -1, self.a.num_heads, self.a.d_kv).transpose(1, 2) for p in (self.k, self.v))
        mask = bias.to(q.dtype) if bias is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """`wo(act(wi_0 x) * wi_1 x)` when gated (v1.1), else `wo(act(wi x))` (the original ReLU)."""

    def __init__(self, a: T5Args) -> None:
        super().__init__()
        self.act = ACTIVATIONS[a.activation]
        if a.gated:
            self.wi_0, self.wi_1 = nn.Linear(a.d_model, a.d_ff, bias=False), nn.Linear(a.d_model, a.d_ff, bias=False)
        else:
            self.wi = nn.Linear(a.d_model, a.d_ff, bias=False)
        self.wo = nn.Linear(a.d_ff, a.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if hasattr(self, "wi_0") else self.act(self.wi(x))
        return self.wo(h)


class _SelfAttentionLayer(nn.Module):
    def __init__(self, a: T5Args, has_bias_table: bool) -> None:
        super().__init__()
        self.SelfAttention = Attention(a, has_bias_table)
        self.layer_norm = RMSNorm(a.d_model, a.norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class _CrossAttentionLayer(nn.Module):
    def __init__(self, a: T5Args) -> None:
        super().__init__()
        self.EncDecAttention = Attention(a)
        self.layer_norm = RMSNorm(a.d_model, a.norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return x + self.EncDecAttention(self.layer_norm(x), bias, memory)


class _FeedForwardLayer(nn.Module):
    def __init__(self, a: T5Args) -> None:
        super().__init__()
        self.DenseReluDense = FeedForward(a)
        self.layer_norm = RMSNorm(a.d_model, a.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class _Block(nn.Module):
    def __init__(self, a: T5Args, first: bool, decoder: bool) -> None:
        super().__init__()
        sublayers = [_SelfAttentionLayer(a, first)]
        if decoder:
            sublayers.append(_CrossAttentionLayer(a))
        self.layer = nn.ModuleList([*sublayers, _FeedForwardLayer(a)])

    def forward(self, x, self_bias, memory=None, cross_bias=None):
        x = self.layer[0](x, self_bias)
        if memory is not None:
            x = self.layer[1](x, cross_bias, memory)
        return self.layer[-1](x)


class _Stack(nn.Module):
    def __init__(self, a: T5Args, layers: int, decoder: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(_Block(a, i == 0, decoder) for i in range(layers))
        self.final_layer_norm = RMSNorm(a.d_model, a.norm_eps)

    @property
    def bias_table(self) -> Attention:
        return self.block[0].layer[0].SelfAttention


def key_mask_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | float:
    """(B, 1, 1, keys) additive bias hiding padded keys (mask False), or 0.0 without a mask."""
    if mask is None:
        return 0.0
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)[
        :, None, None, :
    ]


class T5(nn.Module):
    """T5ForConditionalGeneration: `forward(input_ids, decoder_input_ids)` gives the decoder's logits over
    the vocabulary; `encode` and `decode` run the two stacks apart (generation encodes once)."""

    LORA_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wi", "wo"]

    def __init__(self, args: T5Args) -> None:
        super().__init__()
        self.args = args
        self.shared = nn.Embedding(args.vocab_size, args.d_model)
        self.encoder = _Stack(args, args.num_layers, decoder=False)
        self.decoder = _Stack(args, args.num_decoder_layers, decoder=True)
        self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.after_load()

    def after_load(self) -> None:
        if self.args.tie_embeddings:
            self.lm_head.weight = self.shared.weight

    def init_weights(self, generator: torch.Generator) -> None:
        """T5's initialisation (Mesh TensorFlow's): each matrix normal with std 1/sqrt(fan-in), the query's
        also divided by sqrt(d_kv) (T5 does not scale attention logits), embeddings normal(0, 1), norms 1.
        The head gets 1/sqrt(d_model), so the first logits are of unit scale."""
        a, inner = self.args, self.args.num_heads * self.args.d_kv
        std = {".q.": (a.d_model * a.d_kv) ** -0.5, ".o.": inner**-0.5, ".wo.": a.d_ff**-0.5, "shared.": 1.0}
        for name, p in self.named_parameters():
            with torch.no_grad():
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    s = next((v for k, v in std.items() if k in f".{name}"), a.d_model**-0.5)
                    p.normal_(0.0, s, generator=generator)

    def _run(self, stack: _Stack, x: torch.Tensor, *args) -> torch.Tensor:
        for block in stack.block:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        return stack.final_layer_norm(x)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input ids (B, T) and their mask (True: a real token) -> the encoder's final states."""
        t = ids.shape[1]
        x = self.shared(ids)
        bias = self.encoder.bias_table.position_bias(t, t, True, ids.device).to(x.dtype) + key_mask_bias(mask, x.dtype)
        return self._run(self.encoder, x, bias)

    def decode(self, ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder input ids (B, S) (the targets shifted right behind decoder_start_token_id) attending to
        the encoder's states -> the decoder's final states."""
        s = ids.shape[1]
        x = self.shared(ids)
        future = torch.ones(s, s, dtype=torch.bool, device=ids.device).triu(1)
        causal = torch.zeros(s, s, dtype=x.dtype, device=ids.device).masked_fill(future, torch.finfo(x.dtype).min)
        self_bias = self.decoder.bias_table.position_bias(s, s, False, ids.device).to(x.dtype) + causal
        # cross-attention has no position bias: only padded keys to hide, if any
        cross_bias = None if memory_mask is None or bool(memory_mask.all()) else key_mask_bias(memory_mask, x.dtype)
        return self._run(self.decoder, x, self_bias, memory, cross_bias)

    def head_input(self, states: torch.Tensor) -> torch.Tensor:
        """The decoder's states as the head reads them (the original T5 scales them by d_model ** -0.5)."""
        return states * self.args.d_model**-0.5 if self.args.scale_decoder_outputs else states

    def forward(
        self,
        ids: torch.Tensor,
        decoder_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        hidden_only: bool = False,
    ) -> torch.Tensor:
        out = self.head_input(self.decode(decoder_ids, self.encode(ids, mask), mask))
        return out if hidden_only else self.lm_head(out)


def shift_right(targets: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """The decoder's input for `targets`: start_id, then the targets but the last (IGNORE labels as pad)."""
    out = torch.full_like(targets, pad_id)
    out[:, 0] = start_id
    out[:, 1:] = targets[:, :-1].clamp(min=0) + (targets[:, :-1] < 0) * pad_id
    return out


def pair_batch(pairs: list, idx: list[int], pad: int, start: int, device):
    """Padded inputs and their mask, the decoder's inputs (targets shifted right) and the labels (IGNORE
    on padding) of the (input ids, target ids) pairs `idx`."""
    from lmkiln.model.loss import IGNORE

    sources, targets = [pairs[i][0] for i in idx], [pairs[i][1] for i in idx]
    x = torch.full((len(idx), max(map(len, sources))), pad, dtype=torch.long)
    mask = torch.zeros(x.shape, dtype=torch.bool)
    y = torch.full((len(idx), max(map(len, targets))), IGNORE, dtype=torch.long)
    for r, (s, t) in enumerate(zip(sources, targets)):
        x[r, : len(s)], mask[r, : len(s)], y[r, : len(t)] = torch.tensor(s), True, torch.tensor(t)
    return x.to(device), mask.to(device), shift_right(y, start, pad).to(device), y.to(device)


def target_losses(run, head: torch.Tensor, batch) -> torch.Tensor:
    """Each labelled target token's cross-entropy (`run`: the model, maybe wrapped; `head`: its lm_head
    weight); the head runs on the labelled positions alone."""
    from lmkiln.model.loss import IGNORE, linear_cross_entropy

    x, mask, d, y = batch
    h = run(x, d, mask, hidden_only=True)
    labelled = y != IGNORE
    return linear_cross_entropy(h[labelled], head, y[labelled])


def t5_config(args: T5Args, dtype: torch.dtype = torch.float32) -> dict:
    """config.json as transformers writes it for T5ForConditionalGeneration (or mT5's)."""
    cls = next(c for c, t in T5_CLASSES.items() if t == args.arch)
    return {
        "architectures": [cls],
        "model_type": args.arch,
        "vocab_size": args.vocab_size,
        "d_model": args.d_model,
        "d_kv": args.d_kv,
        "d_ff": args.d_ff,
        "num_layers": args.num_layers,
        "num_decoder_layers": args.num_decoder_layers,
        "num_heads": args.num_heads,
        "relative_attention_num_buckets": args.relative_attention_num_buckets,
        "relative_attention_max_distance": args.relative_attention_max_distance,
        "layer_norm_epsilon": args.norm_eps,
        "feed_forward_proj": args.feed_forward_proj,
        "tie_word_embeddings": args.tie_embeddings,
        "scale_decoder_outputs": args.scale_decoder_outputs,
        "is_encoder_decoder": True,
        "pad_token_id": args.pad_token_id,
        "eos_token_id": args.eos_token_id,
        "decoder_start_token_id": args.decoder_start_token_id,
        "n_positions": args.max_seq_len,
        "dropout_rate": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def t5_args_from_config(config: dict, where: str) -> T5Args:
    """T5Args from a T5 / T5 v1.1 / Flan-T5 / mT5 config.json; a value lmkiln does not implement is
    refused by name."""
    proj = config.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in ACTIVATIONS:
        raise ValueError(
            f"{where}: feed_forward_proj={proj!r} is not supported (expected relu, gated-gelu, gated-silu, ...)"
        )
    for key, wanted in (("is_decoder", False), ("is_encoder_decoder", True)):
        if config.get(key, wanted) != wanted:
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported (expected {wanted!r})")
    # before transformers 5, tie_word_embeddings meant both a tied head and scaled outputs (the original
    # T5; v1.1 sets it false); transformers 5 writes scale_decoder_outputs apart and ties by default
    tied = config.get("tie_word_embeddings", True) is not False
    layers = config.get("num_layers", 6)
    return T5Args(
        vocab_size=config["vocab_size"],
        d_model=config.get("d_model", 512),
        d_kv=config.get("d_kv", 64),
        d_ff=config.get("d_ff", 2048),
        num_layers=layers,
        num_decoder_layers=config.get("num_decoder_layers") or layers,
        num_heads=config.get("num_heads", 8),
        relative_attention_num_buckets=config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=config.get("relative_attention_max_distance", 128),
        norm_eps=config.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=proj,
        tie_embeddings=tied,
        scale_decoder_outputs=bool(config.get("scale_decoder_outputs", tied)),
        pad_token_id=config.get("pad_token_id", 0),
        eos_token_id=config.get("eos_token_id", 1),
        decoder_start_token_id=config.get("decoder_start_token_id", 0),
        max_seq_len=config.get("n_positions", 512),
        arch=config.get("model_type", "t5"),
    )


# T5's sizes: the decoder presets' width, depth (each stack), heads and feed-forward
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688),
    "mini": dict(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1024),
    "small": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048),
    "medium": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=2816),
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=32, intermediate_size=8192),
}


def build_t5_args(model_cfg, vocab_size: int, special: dict) -> T5Args:
    """T5Args from the recipe's model section: the preset's width, depth (each stack) and heads, a gated
    GELU feed-forward of intermediate_size, an own head (T5 v1.1)."""
    dims = recipe_dims(PRESETS, model_cfg)
    if dims["hidden_size"] % dims["num_heads"]:
        raise ValueError(f"hidden_size {dims['hidden_size']} does not split into {dims['num_heads']} heads")
    return T5Args(
        vocab_size=vocab_size,
        d_model=dims["hidden_size"],
        d_kv=dims["hidden_size"] // dims["num_heads"],
        d_ff=dims["intermediate_size"],
        num_layers=dims["num_layers"],
        num_decoder_layers=dims["num_layers"],
        num_heads=dims["num_heads"],
        norm_eps=model_cfg.norm_eps,
        pad_token_id=special.get("pad", 0),  # T5's ids when no vocabulary is at hand (kiln estimate)
        eos_token_id=special.get("eos", 1),
        decoder_start_token_id=special.get("pad", 0),
        max_seq_len=model_cfg.max_seq_len,
    )


def _describe(args: T5Args) -> str:
    head = (
        "tied head, outputs scaled"
        if args.scale_decoder_outputs
        else "tied head"
        if args.tie_embeddings
        else "own head"
    )
    return (
        f"{args.num_layers} encoder + {args.num_decoder_layers} decoder layers, d_model {args.d_model}, "
        f"{args.num_heads} heads, {args.feed_forward_proj}, {head}, vocab {args.vocab_size}"
    )


FAMILY = Family(
    name="T5",
    kind="seq2seq",
    args_type=T5Args,
    model_types=tuple(T5_CLASSES.values()),
    hf_classes=tuple(T5_CLASSES),
    from_hf=lambda config, architecture, where: t5_args_from_config(config, where),
    to_hf=t5_config,
    build=T5,
    tied_head=lambda args: "lm_head.weight" if args.tie_embeddings else None,  # the original T5: `shared`
    objective="span",
    describe=_describe,
    archs=("t5",),
    from_recipe=build_t5_args,
    presets=PRESETS,
    vocabulary=Vocabulary(
        kind="t5",
        specials=("<pad>", "</s>", "<unk>"),  # T5's ids 0, 1 and 2
        names={"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        ids={"bos": None, "eos": "</s>", "pad": "<pad>"},  # documents end with </s>, nothing before them
        marker="<extra_id_0>",
        sentinels=tuple(f"<extra_id_{i}>" for i in range(100)),
        single="$A </s>",
        pair="$A </s> $B:1 </s>:1",
        template_tokens=("</s>",),
    ),
    config_keys=("pretrain.noise_density", "pretrain.mean_span"),
    display={"t5": "T5", "mt5": "mT5"},
    skipped_weights=IGNORED_T5_WEIGHTS,
    lora_targets=tuple(T5.LORA_TARGETS),
    sentencepiece_vocab=True,
    start_token="decoder_start_token_id",
)
