"""The decoder: a Llama-compatible transformer you can read in one sitting.

RMSNorm, rotary embeddings (HF's rotate-half convention), SwiGLU MLP, grouped-query attention through
`F.scaled_dot_product_attention`. Module names equal Hugging Face's `LlamaForCausalLM`, so our
state_dict is theirs and a saved directory loads in transformers as it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=688),
    "mini": dict(hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=6, intermediate_size=1024),
    "small": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2048),
    "medium": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=2816),
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192),
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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_embeddings else 2) + self.num_layers * per_layer + h

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight multiply-add plus attention (PaLM appendix B)."""
        non_embed = self.num_params() - self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return 6 * (non_embed + self.vocab_size * self.hidden_size) + 12 * self.num_layers * self.hidden_size * seq_len

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF does, so bf16 runs match its numerics.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys/values per layer; `length` tokens are filled."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype) -> None:
        shape = (batch, args.num_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.num_layers)]
        self.length = 0
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.args, self.layer = args, layer
        hd = args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(args.num_heads * hd, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        a = self.args
        q = self.q_proj(x).view(b, t, a.num_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, a.num_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            cache.k[self.layer][:, :, start:start + t] = k
            cache.v[self.layer][:, :, start:start + t] = v
            k = cache.k[self.layer][:, :, :start + t]
            v = cache.v[self.layer][:, :, :start + t]
        if a.num_kv_heads != a.num_heads:
            rep = a.num_heads // a.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif t == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # a chunk appended after cached tokens: causal within the chunk, full over the past
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        if args.hidden_size % args.num_heads or args.num_heads % args.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                s = std / math.sqrt(2 * self.args.num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                with torch.no_grad():
                    p.normal_(0.0, s, generator=generator)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_only. Appends to `cache` if given."""
        t = idx.shape[1]
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + t, device=idx.device)
        cos, sin = rope_tables(self.args.head_dim, positions, self.args.rope_theta)
        x = self.model.embed_tokens(idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.length += t
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)


def build_args(model_cfg, vocab_size: int, special: dict[str, int | None]) -> ModelArgs:
    """ModelArgs from the recipe's model section: preset first, explicit dims on top."""
    dims = dict(PRESETS[model_cfg.preset or "tiny"])
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        value = getattr(model_cfg, key)
        if value is not None:
            dims[key] = value
    if model_cfg.num_heads is not None and model_cfg.num_kv_heads is None:
        dims["num_kv_heads"] = dims["num_heads"]
    return ModelArgs(vocab_size=vocab_size, max_seq_len=model_cfg.max_seq_len, rope_theta=model_cfg.rope_theta,
                     norm_eps=model_cfg.norm_eps, tie_embeddings=model_cfg.tie_embeddings,
                     bos_token_id=special.get("bos"), eos_token_id=special.get("eos"),
                     pad_token_id=special.get("pad"), **dims)
