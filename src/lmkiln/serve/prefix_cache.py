"""Automatic prefix caching, as vLLM's: the keys and values of every full block of BLOCK prompt tokens
are kept after a prefill, named by a hash of the block and all before it (and the adapter, whose
LoRA changes them). A new prompt that starts with cached blocks gets them copied into its slot and
prefills only the rest, so a system prompt shared by every request is computed once. The store has a
byte budget; past it, the least recently used blocks go first."""

from __future__ import annotations

import array
import collections
import hashlib

import torch

from lmkiln.model.inference.kv_cache import SlotCache

BLOCK = 32  # tokens per cached block: a hit is rounded down to a whole number of blocks


def block_hashes(prompt: list[int], adapter: int) -> list[bytes]:
    """One hash per full block of `prompt`, each covering the block and every token before it."""
    hashes, h = [], hashlib.blake2b(str(adapter).encode(), digest_size=16).digest()
    for start in range(0, len(prompt) - BLOCK + 1, BLOCK):
        block = array.array("q", prompt[start : start + BLOCK]).tobytes()
        h = hashlib.blake2b(h + block, digest_size=16).digest()
        hashes.append(h)
    return hashes


class PrefixCache:
    """Cached blocks of keys and values, each a (2, layers, kv_heads, BLOCK, head_dim) tensor."""

    def __init__(self, cache: SlotCache, max_bytes: int) -> None:
        self.cache, self.max_bytes = cache, max_bytes
        self.blocks: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self.nbytes = 0
        self.queried = self.hit = 0  # prompt tokens looked up, and found (for /metrics)

    def restore(self, slot: int, prompt: list[int], adapter: int) -> int:
        """Copy the longest cached prefix of `prompt` into `slot`; the tokens it covers (at least one
        token is always left to prefill: its logits pick the first reply token)."""
        hashes = block_hashes(prompt[:-1], adapter)
        found = []
        for h in hashes:
            if h not in self.blocks:
                break
            self.blocks.move_to_end(h)
            found.append(self.blocks[h])
        self.queried += len(prompt)
        if not found:
            return 0
        n = len(found) * BLOCK
        self.cache.reserve(n + 1)
        kv = torch.cat(found, dim=3)  # (2, layers, heads, n, dim)
        for layer in range(len(self.cache.k)):
            self.cache.k[layer][slot, :, :n] = kv[0, layer]
            self.cache.v[layer][slot, :, :n] = kv[1, layer]
        self.hit += n
        return n

    def store(self, slot: int, prompt: list[int], adapter: int) -> None:
        """Keep the full blocks of `prompt`, now prefilled in `slot`, that are not cached yet."""
        for i, h in enumerate(block_hashes(prompt, adapter)):
            if h in self.blocks:
                self.blocks.move_to_end(h)
                continue
            a, b = i * BLOCK, (i + 1) * BLOCK
            kv = torch.stack(
                [
                    torch.stack([k[slot, :, a:b] for k in self.cache.k]),
                    torch.stack([v[slot, :, a:b] for v in self.cache.v]),
                ]
            )
            self.blocks[h] = kv
            self.nbytes += kv.numel() * kv.element_size()
            while self.nbytes > self.max_bytes and self.blocks:  # least recently used first
                _, old = self.blocks.popitem(last=False)
                self.nbytes -= old.numel() * old.element_size()
