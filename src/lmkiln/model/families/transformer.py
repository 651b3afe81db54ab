"""The decoder: a Llama-compatible transformer you can read in one sitting.

RMSNorm, rotary embeddings (HF's rotate-half convention), SwiGLU MLP, grouped-query attention through
`F.scaled_dot_product_attention`. Module names equal Hugging Face's `LlamaForCausalLM`, so our
state_dict is theirs and a saved directory loads in transformers as it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from lmkiln.model.families.family import Family, recipe_dims
from lmkiln.model.linear import Linear


class KVCache(Protocol):
    """What the decoder asks of a cache (model/inference/kv_cache.py has them: caches live with their
    users, so the model names only the calls it makes)."""

    def positions_and_mask(self, t: int, window: int | None, device) -> tuple[torch.Tensor, object]: ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, t: int) -> None: ...


PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=688),
    "mini": dict(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=6, intermediate_size=1024),
    "small": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2048),
    "medium": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=2816),
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192),
}


ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def hf_shape(args, architecture: str, model_type: str) -> dict:
    """The config.json keys every family lmkiln writes shares: its class, vocabulary, width and depth."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
    }


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 688
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    arch: str = "llama"  # llama | qwen2 (q/k/v bias) | qwen3 (QK-norm) | mistral (sliding window)
    head_dim: int | None = None  # defaults to hidden_size // num_heads (Qwen3 sets its own)
    sliding_window: int | None = None  # attend to the last N tokens, this one included (Mistral)
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", "factor": ..., ...} as in HF configs

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch '{self.arch}' is not one of {', '.join(ARCHS)}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide by num_kv_heads {self.num_kv_heads}")
        if self.sliding_window is not None and self.arch != "mistral":
            raise ValueError("sliding_window is a Mistral feature: set arch to mistral")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ROPE_SCALINGS:
                raise ValueError(
                    f"rope_scaling type {kind!r} is not implemented (implemented: {', '.join(ROPE_SCALINGS)})"
                )

    @property
    def qkv_bias(self) -> bool:
        return self.arch == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.arch == "qwen3"

    def num_params(self) -> int:
        h, i, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0) + (2 * hd if self.qk_norm else 0)
        per_layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_embeddings else 2) + self.num_layers * per_layer + h

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight multiply-add plus attention (PaLM appendix B)."""
        non_embed = self.num_params() - self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        attended = min(seq_len, self.sliding_window or seq_len)
        return (
            6 * (non_embed + self.vocab_size * self.hidden_size)
            + 12 * self.num_layers * self.num_heads * self.head_dim * attended
        )

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNorm.apply(x, self.weight, self.variance_epsilon)
        # nothing to differentiate (generation): without autograd.Function's bookkeeping, in place
        normed = _rms_normed(x, self.variance_epsilon)[0]
        return (
            normed.mul_(self.weight)
            if normed.dtype == torch.promote_types(normed.dtype, self.weight.dtype)
            else self.weight * normed
        )


def _rms_normed(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / rms(x) in x's dtype, computed in (at least) fp32 as HF does, and 1 / rms(x)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * inv).to(x.dtype), inv


class _RMSNorm(torch.autograd.Function):
    """HF's RMSNorm (normalised in fp32, so bf16 runs match its numerics) with its gradient written out:
    autograd's chain through pow, mean, rsqrt and two products takes about twice the memory passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normed, inv = _rms_normed(x, eps)
        ctx.save_for_backward(normed, inv, weight)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, inv, weight = ctx.saved_tensors
        n = normed.to(inv.dtype)
        g = grad.to(inv.dtype) * weight.to(inv.dtype)
        # d/dx of x * inv(x) applied to g: (g - n * mean(g * n)) * inv
        mean = torch.linalg.vecdot(g, n, dim=-1).unsqueeze(-1) / n.shape[-1]
        grad_x = torch.addcmul(g, n, mean, value=-1).mul_(inv).to(normed.dtype)
        grad_w = (grad * normed).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


ROPE_SCALINGS = ("default", "linear", "llama3")


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """Rotary frequencies for a longer context: `linear` divides them all by the factor; `llama3`
    (Llama 3.1/3.2) divides the low ones, keeps the high ones, and blends those between."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_tables(
    head_dim: int, positions: torch.Tensor, theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles, each angle twice (the halves HF's layout rotates
    together); the first half of sin is negated, so `apply_rope` needs no negation."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim)
    )
    inv_freq = scaled_inv_freq(inv_freq, scaling)
    freqs = positions.float()[..., None] * inv_freq  # positions (T,) or (B, T) for packed rows
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)


def rope_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation of one position per row as (rows or 1, head_dim, head_dim) matrices M, with
    x @ M = apply_rope(x, cos, sin): cos on the diagonal, and each element's `sin` where its partner in
    the other half reads it."""
    d = cos.shape[-1]
    return (torch.diag_embed(cos) + torch.diag_embed(sin).roll(d // 2, -2)).reshape(-1, d, d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor | None) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1): the swap of halves is a
    roll and its sign is in `sin`, three passes over x where the textbook form takes five. An eager
    decode step gives `cos` as rope_matrix(cos, sin) and no `sin`: one small matmul per layer, where the
    elementwise form costs a dozen operations' overhead for 64 numbers a head."""
    if sin is None:  # x (rows, heads, 1, d): each row's heads through its own matrix, one batched matmul
        return torch.matmul(x.reshape(x.shape[0], -1, x.shape[-1]), cos).view(x.shape)
    if torch.is_grad_enabled():
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin).to(x.dtype)
    # inference: each half takes the other half's product in place, with no rolled copy of x (the same
    # arithmetic, element by element)
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], sin[..., :h])
    out[..., h:].addcmul_(x[..., :h], sin[..., h:])
    return out.to(x.dtype)


CAUSAL = "causal"
SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA's enable_gqa


def attention_mask(start: int, t: int, window: int | None, device) -> str | torch.Tensor | None:
    """What queries at positions start..start+t-1 may see of keys 0..start+t-1: CAUSAL (SDPA's own
    causal path, the fast one), None (everything: one new token, no window in play), or a bool mask."""
    total = start + t
    if window is None or total <= window:
        if start == 0:
            return CAUSAL
        if t == 1:
            return None
    return visible_keys(torch.arange(start, total, device=device), torch.arange(total, device=device), window)


def visible_keys(positions: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """(..., len(keys)) bool: each query position sees the keys at or before it, and with a sliding
    window only the last `window` of those (transformers' `kv > q - window` rule)."""
    allowed = keys <= positions[..., None]
    if window is not None:
        allowed &= keys > positions[..., None] - window
    return allowed


def packed_positions(segments: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where each example of a packed row begins (segments: (B, T) ids)."""
    t = segments.shape[1]
    index = torch.arange(t, device=segments.device).expand_as(segments)
    begins = torch.ones_like(segments, dtype=torch.bool)
    begins[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(begins, index, 0).cummax(dim=1).values


def packed_mask(segments: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1, T, T) bool: causal, and only within the same example, so packed examples never see
    each other."""
    index = torch.arange(segments.shape[1], device=segments.device)
    return ((segments[:, :, None] == segments[:, None, :]) & visible_keys(index, index, window))[:, None]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new query per row (a decode step) as two small matmuls, each group of query
    heads against its key/value head: SDPA's flash kernel takes ~90 us a call for this on CPU (its
    blocking is made for long queries), the matmuls a few. Scores and softmax in fp32, as SDPA's."""
    b, heads, t, hd = q.shape
    groups = k.shape[1]
    qg = q.reshape(b, groups, heads // groups, hd)  # t == 1: a group's query heads as rows
    if q.is_cpu and torch.compiler.is_compiling():
        # compiled on CPU: each query head against its group's keys as a sum over the head dimension,
        # which inductor makes one loop on every core reading each key once (a step's keys come from
        # memory, not cache; the matmul read them on one core): a decode step measured 4% faster
        per_head = [(qg[:, :, r, None] * k).sum(-1) for r in range(qg.shape[2])]
        scores = torch.stack(per_head, 2).float().mul_(hd**-0.5)  # (b, groups, rep, keys)
    else:
        scores = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(hd**-0.5)
    if mask is not None:  # (b or 1, 1, 1, keys) bool
        scores.masked_fill_(~mask.reshape(mask.shape[0], 1, 1, -1), float("-inf"))
    y = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # (b, groups, rep, hd)
    return y.reshape(b, heads, t, hd)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.qkv_proj: nn.Module | None = None  # q, k and v fused (model/io/quantized.py installs it)
        self.args, self.layer = args, layer
        hd = args.head_dim
        self.q_proj = Linear(args.hidden_size, args.num_heads * hd, bias=args.qkv_bias)
        self.k_proj = Linear(args.hidden_size, args.num_kv_heads * hd, bias=args.qkv_bias)
        self.v_proj = Linear(args.hidden_size, args.num_kv_heads * hd, bias=args.qkv_bias)
        self.o_proj = Linear(args.num_heads * hd, args.hidden_size, bias=False)
        if args.qk_norm:  # Qwen3: RMSNorm over each head's query and key, before RoPE
            self.q_norm = RMSNorm(hd, args.norm_eps)
            self.k_norm = RMSNorm(hd, args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        mask: str | torch.Tensor | None = CAUSAL,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        a = self.args
        if self.qkv_proj is not None and not a.qk_norm:  # q, k and v as one matmul, q and k rotated as one
            qkv = self.qkv_proj(x).view(b, t, a.num_heads + 2 * a.num_kv_heads, a.head_dim).transpose(1, 2)
            q, k = apply_rope(qkv[:, : a.num_heads + a.num_kv_heads], cos, sin).split([a.num_heads, a.num_kv_heads], 1)
            v = qkv[:, a.num_heads + a.num_kv_heads :]
        else:
            if self.qkv_proj is not None:
                q, k, v = self.qkv_proj(x).split(self.fused_sizes, -1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.view(b, t, a.num_heads, a.head_dim)
            k = k.view(b, t, a.num_kv_heads, a.head_dim)
            v = v.view(b, t, a.num_kv_heads, a.head_dim).transpose(1, 2)
            if a.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if t == 1 and not torch.is_grad_enabled() and not isinstance(mask, str):
            return self.o_proj(decode_attention(q, k, v, mask).transpose(1, 2).reshape(b, t, -1))
        gqa = {}
        if a.num_kv_heads != a.num_heads:
            if SDPA_GQA:  # grouped heads inside the kernel: no repeated keys/values held for backward
                gqa = {"enable_gqa": True}
            else:
                rep = a.num_heads // a.num_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if isinstance(mask, str):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_up_proj: nn.Module | None = None  # gate and up fused, as qkv_proj
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # inference: the same products in place, two fewer passes over the widest activation
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, -1)
            return self.down_proj(F.silu(gate, inplace=True).mul_(up))
        h = F.silu(self.gate_proj(x), inplace=True)
        return self.down_proj(h.mul_(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, cache, mask):
        if torch.is_grad_enabled():
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
            return x + self.mlp(self.post_attention_layernorm(x))
        # inference: the residual stream is this forward's own tensor, updated in place
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x.add_(self.mlp(self.post_attention_layernorm(x)))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.gradient_checkpointing = False
        self.model = Backbone(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.after_load()

    def after_load(self) -> None:
        """Tie the head to the embedding again (a load assigns each stored tensor on its own)."""
        if self.args.tie_embeddings and isinstance(self.model.embed_tokens, nn.Embedding):  # not a quantized table
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers);
        biases 0, norms 1."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm weights
                nn.init.ones_(p)
            else:
                s = (
                    std / math.sqrt(2 * self.args.num_layers)
                    if name.endswith(("o_proj.weight", "down_proj.weight"))
                    else std
                )
                with torch.no_grad():
                    p.normal_(0.0, s, generator=generator)

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        segments: torch.Tensor | None = None,
        hidden_only: bool = False,
        layout: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_only. Appends to `cache` if given.
        `segments` (B, T) marks the examples of packed rows: each attends only to itself. `layout` gives
        positions (B, T) and a boolean mask (B, 1, T, T) outright (several continuations of one shared
        context in a row). `hidden_only` returns the final hidden states instead (a loss that runs the
        head itself; DDP still sees a forward)."""
        x = self.hidden_states(idx, cache, segments, layout)
        if hidden_only:
            return x
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)

    def hidden_states(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        segments: torch.Tensor | None = None,
        layout: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> the final normed hidden states (B, T, hidden)."""
        t = idx.shape[1]
        window = self.args.sliding_window
        if layout is not None:
            positions, mask = layout
        elif segments is not None:
            positions, mask = packed_positions(segments), packed_mask(segments, window)
        elif cache is not None:
            positions, mask = cache.positions_and_mask(t, window, idx.device)
        else:
            positions, mask = torch.arange(t, device=idx.device), attention_mask(0, t, window, idx.device)
        cos, sin = rope_tables(self.args.head_dim, positions, self.args.rope_theta, self.args.rope_scaling)
        x = self.model.embed_tokens(idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        # an eager decode step rotates by matrix; a compiled one elementwise, which inductor makes a loop
        # in the kernel that made q and k (6% faster a step than the matrix's external matmul a layer)
        if t == 1 and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            cos, sin = rope_matrix(cos, sin), None
        elif positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # a position per row: broadcast over heads
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for block in self.model.layers:
            if checkpointed:  # keep only each block's input; recompute the rest in the backward pass
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, None, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.advance(t)
        return self.model.norm(x)


def build_args(model_cfg, vocab_size: int, special: dict[str, int | None]) -> ModelArgs:
    """ModelArgs from the recipe's model section: preset first, explicit dims on top."""
    dims = recipe_dims(PRESETS, model_cfg)
    if model_cfg.num_heads is not None and model_cfg.num_kv_heads is None:
        dims["num_kv_heads"] = dims["num_heads"]
    return ModelArgs(
        vocab_size=vocab_size,
        max_seq_len=model_cfg.max_seq_len,
        rope_theta=model_cfg.rope_theta,
        norm_eps=model_cfg.norm_eps,
        tie_embeddings=model_cfg.tie_embeddings,
        arch=model_cfg.arch,
        head_dim=model_cfg.head_dim,
        sliding_window=model_cfg.sliding_window,
        bos_token_id=special.get("bos"),
        eos_token_id=special.get("eos"),
        pad_token_id=special.get("pad"),
        **dims,
    )


# the decoder's HF classes, one per arch; and what else transformers names them for a label head
DECODER_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}


def decoder_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    """config.json as transformers writes it for the arch's *ForCausalLM."""
    config = {
        **hf_shape(args, DECODER_CLASSES[args.arch], args.arch),
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling,
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
        "pad_token_id": args.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if args.arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    elif args.arch in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.num_layers)
        if args.arch == "qwen3":
            config["attention_bias"] = False
    elif args.arch == "mistral":
        config["sliding_window"] = args.sliding_window
    return config


def _refused_settings(arch: str) -> list[tuple[str, object]]:
    """The config.json values a decoder must have: anything else is a feature lmkiln does not implement."""
    refused = [
        ("mlp_bias", False),
        ("hidden_act", "silu"),
        ("attn_logit_softcapping", None),
        ("final_logit_softcapping", None),
    ]
    if arch in ("llama", "qwen3"):
        refused.append(("attention_bias", False))  # bias on all four projections: not implemented
    if arch in ("qwen2", "qwen3"):
        refused.append(("use_sliding_window", False))
    return refused


def decoder_args_from_config(config: dict, architecture: str, where: str) -> ModelArgs:
    """ModelArgs from a Llama, Qwen2, Qwen3 or Mistral config.json; a value lmkiln does not implement is
    refused by name (a ValueError)."""
    arch = {cls: a for a, cls in DECODER_CLASSES.items()}.get(architecture, config.get("model_type"))
    for key, ok in _refused_settings(arch):
        if config.get(key, ok) != ok:
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported (expected {ok!r})")
    eos = config.get("eos_token_id")
    heads = config.get("num_attention_heads", 0)
    rope = _rope_settings(config)
    try:
        return ModelArgs(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            intermediate_size=config["intermediate_size"],
            max_seq_len=config.get("max_position_embeddings", 2048),
            rope_theta=rope["theta"],
            rope_scaling=rope["scaling"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            tie_embeddings=config.get("tie_word_embeddings", False),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=config.get("pad_token_id"),
            arch=arch,
            head_dim=config.get("head_dim"),
            sliding_window=config.get("sliding_window") if arch == "mistral" else None,
        )
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _rope_settings(config: dict) -> dict:
    """Rotary settings from either config style: transformers 4's `rope_theta` + `rope_scaling`, or
    transformers 5's `rope_parameters` {rope_type, rope_theta, factor, ...}."""
    params = dict(config.get("rope_parameters") or {})
    theta = float(config.get("rope_theta", params.pop("rope_theta", 10000.0)))
    params.pop("rope_theta", None)
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = dict(scaling)
        scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type")
    return {"theta": theta, "scaling": scaling}


def _describe(args: ModelArgs) -> str:
    scaling = f", rope scaling {args.rope_scaling['rope_type']}" if args.rope_scaling else ""
    return (
        f"{args.num_layers} layers, hidden {args.hidden_size}, {args.num_heads} heads ({args.num_kv_heads} kv), "
        f"vocab {args.vocab_size}{scaling}"
    )


FAMILY = Family(
    name="decoder",
    kind="decoder",
    args_type=ModelArgs,
    model_types=ARCHS,
    hf_classes=tuple(DECODER_CLASSES.values()),
    from_hf=decoder_args_from_config,
    to_hf=decoder_config,
    build=Transformer,
    tied_head=lambda args: "lm_head.weight" if args.tie_embeddings else None,
    objective="causal",
    describe=_describe,
    archs=ARCHS,
    from_recipe=build_args,
    presets=PRESETS,
    display={"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"},
    label_body=lambda args: replace(args, tie_embeddings=True),  # a classifier keeps no LM head of its own
    sequence_classifier={a: c.replace("ForCausalLM", "ForSequenceClassification") for a, c in DECODER_CLASSES.items()},
)
