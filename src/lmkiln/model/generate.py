"""Generation with a KV cache: greedy or sampled (temperature, top-k, top-p), streaming token by token."""

from __future__ import annotations

from typing import Iterator

import torch

from lmkiln.model.transformer import KVCache, StaticKVCache, Transformer


def _decode_step(model: Transformer) -> torch.nn.Module:
    """The model compiled for one-token steps over a StaticKVCache: compiled on first use (tens of
    seconds on CPU), then one call per token with no Python in between. Kept on the model itself, outside
    its submodules (so not in its state_dict), and so never confused with another model's."""
    if "_decode_step" not in model.__dict__:
        object.__setattr__(model, "_decode_step", torch.compile(model, fullgraph=True))
    return model.__dict__["_decode_step"]


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(0) - sorted_p >= top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def stream(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, stop_ids: list[int] | None = None,
           seed: int | None = None, compile: bool = False) -> Iterator[int]:
    """Yield new token ids one at a time; stops at a stop id (not yielded) or the length limits.
    `compile`: decode steps run the compiled model over a whole-context static cache (same tokens)."""
    model.eval()
    device = next(model.parameters()).device
    limit = model.args.max_seq_len
    prompt = prompt[-limit:]
    max_new_tokens = min(max_new_tokens, limit - len(prompt))
    if max_new_tokens <= 0:
        return
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    dtype = next(model.parameters()).dtype
    if compile:  # one cache length for every call, so the step compiles once per model
        cache, step = StaticKVCache(model.args, 1, limit, device, dtype), _decode_step(model)
    else:
        cache, step = KVCache(model.args, 1, len(prompt) + max_new_tokens, device, dtype), model
    logits = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)[0, -1]
    stops = set(stop_ids or [])
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if token in stops:
            return
        yield token
        if i + 1 < max_new_tokens:
            logits = step(torch.tensor([[token]], device=device), cache=cache)[0, -1]


class TextStream:
    """Generated token ids to text as it grows, whole UTF-8 characters at a time: a byte-level token can
    end inside a character, and its half would print as U+FFFD."""

    def __init__(self, tok) -> None:
        self.tok, self.ids, self.shown = tok, [], ""

    def push(self, token: int) -> str:
        """Add a token; the new text it completes ('' while a character is unfinished)."""
        self.ids.append(token)
        decoded = self.tok.decode(self.ids)
        if decoded.endswith("\ufffd"):
            return ""
        delta, self.shown = decoded[len(self.shown):], decoded
        return delta

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids)


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    return list(stream(model, prompt, max_new_tokens, **kwargs))
