"""Key/value caches for generation, next to their users: `KVCache` for one batch that advances together
(`generate`), `StaticKVCache` for a compiled decode step (`generate(..., compile=True)`), `SlotCache` for
continuous batching (`kiln serve`'s engine, batched greedy replies in eval). The model asks a cache
only for `positions_and_mask`, `update` and `advance`."""

from __future__ import annotations

import torch
from torch import nn

from lmkiln.model.families.transformer import ModelArgs, attention_mask, visible_keys
from lmkiln.model.inference.memory import release_freed_memory
from lmkiln.model.quant import KERNEL_DTYPE, Int4Linear, Int8Linear


def stored_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a SlotCache keeps a model's keys and values in: the model's own, but bf16 for a
    quantized model, whose keys and values come out of bf16 kernels. Storing them in bf16 rounds them
    about as much again (as llama.cpp's default f16 cache does) and halves a server's largest
    allocation; attention still runs in the model's dtype."""
    if any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules()):
        return KERNEL_DTYPE
    return next(model.parameters()).dtype


class KVCache:
    """Preallocated keys/values per layer for one batch of sequences that advance together; `length`
    tokens are filled."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype) -> None:
        shape = (batch, args.num_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.num_layers)]
        self.length = 0
        self.max_len = max_len

    def positions_and_mask(self, t: int, window: int | None, device) -> tuple[torch.Tensor, str | torch.Tensor | None]:
        start = self.length
        return torch.arange(start, start + t, device=device), attention_mask(start, t, window, device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (B, heads, t, dim); return every key/value filled so far."""
        start, t = self.length, k.shape[2]
        self.k[layer][:, :, start : start + t] = k
        self.v[layer][:, :, start : start + t] = v
        return self.k[layer][:, :, : start + t], self.v[layer][:, :, : start + t]

    def advance(self, t: int) -> None:
        self.length += t


class StaticKVCache(KVCache):
    """A KVCache whose every decode step has the same shapes, for a compiled decode step (`generate(...,
    compile=True)`): the position is a tensor, new keys/values are written by index, and attention runs
    over the whole preallocated cache with a mask of the filled positions. Eager, it costs a little
    more than KVCache (attention over `max_len` keys); compiled once, it runs with no Python per step."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype) -> None:
        super().__init__(args, batch, max_len, device, dtype)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.keys = torch.arange(max_len, device=device)

    def positions_and_mask(self, t: int, window: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        self._positions = self.position + torch.arange(t, device=device)  # every layer's update writes here
        return self._positions, visible_keys(self._positions, self.keys, window)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self._positions, k)
        self.v[layer].index_copy_(2, self._positions, v)
        return self.k[layer], self.v[layer]

    def advance(self, t: int) -> None:
        # only the tensor moves: a Python int changed inside the compiled step would be a guard, and
        # each new value a recompilation (`length` stays 0; `position` is the fill)
        self.position.add_(t)


class SlotCache(KVCache):
    """Keys/values for `slots` independent sequences (continuous batching): each slot has its own
    length, and a forward runs on any subset of slots (`rows`), each row at its own position. Rows
    attend to their own slot only; the keys past a row's length are masked out. Keys and values may be
    stored in a narrower dtype than the model computes in (`stored_dtype`): they are handed back in the
    model's.

    Memory follows use, not the context limit: every slot holds `capacity` tokens, which starts at
    `initial` and doubles (up to `max_len`) when a running sequence needs more (`reserve`), and falls
    back to `initial` when no sequence runs (`release`)."""

    def __init__(self, args: ModelArgs, slots: int, max_len: int, device, dtype, initial: int = 256) -> None:
        self.initial = min(initial, max_len)
        super().__init__(args, slots, self.initial, device, dtype)
        self.context, self.capacity = max_len, self.initial
        self.peak = self.initial  # the most tokens a slot has held room for
        self.lengths = [0] * slots
        self.rows: list[int] = []

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype) -> int:
        """Keys and values of one token in every layer."""
        return 2 * args.num_layers * args.num_kv_heads * args.head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _resize(self, capacity: int) -> None:
        """One layer's tensor at a time, each old one's pages handed back before the next new one is
        made: the cache's size in memory never holds the old and the new sizes together."""
        keep = min(capacity, self.capacity)
        for cache in (self.k, self.v):
            for i in range(len(cache)):
                old = cache[i]
                cache[i] = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                cache[i][:, :, :keep] = old[:, :, :keep]
                del old
                release_freed_memory()
        self.capacity = self.max_len = capacity
        self.peak = max(self.peak, capacity)

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` positions in every slot (at most `max_len`)."""
        if tokens > self.capacity:
            self._resize(min(self.context, max(tokens, 2 * self.capacity)))

    def release(self) -> None:
        """Back to the initial size: call when no sequence is running."""
        if self.capacity > self.initial:
            self._resize(self.initial)

    def positions_and_mask(self, t: int, window: int | None, device) -> tuple[torch.Tensor, str | torch.Tensor | None]:
        starts = torch.tensor([self.lengths[r] for r in self.rows], device=device)
        positions = starts[:, None] + torch.arange(t, device=device)  # (B, t)
        self._rows = torch.tensor(self.rows, device=device)
        self._positions, self._span = positions, max(self.lengths[r] for r in self.rows) + t
        first, last = self.rows[0], self.rows[-1]
        # rows that are consecutive slots read the cache as a view; any other set is gathered (a copy)
        self._view = slice(first, last + 1) if self.rows == list(range(first, last + 1)) else None
        if len(self.rows) == 1:  # one sequence: the plain cache's masks (SDPA's causal path, or none)
            return positions, attention_mask(self.lengths[self.rows[0]], t, window, device)
        return positions, visible_keys(positions, torch.arange(self._span, device=device), window)[
            :, None
        ]  # (B, 1, t, span)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, positions, stored = self._rows[:, None], self._positions, self.k[layer].dtype
        self.k[layer][rows, :, positions] = k.transpose(1, 2).to(stored)
        self.v[layer][rows, :, positions] = v.transpose(1, 2).to(stored)
        picked = self._view if self._view is not None else self._rows
        keys, values = self.k[layer][picked, :, : self._span], self.v[layer][picked, :, : self._span]
        return keys.to(k.dtype), values.to(v.dtype)

    def advance(self, t: int) -> None:
        for r in self.rows:
            self.lengths[r] += t
