"""Near-duplicate removal in two steps, so the expensive one runs in parallel:

1. `signatures`, per work shard: a MinHash signature of each document's word n-gram shingles (rensa,
   in Rust, a batch at a time).
2. `LshIndex`, once over all shards in order: banded locality-sensitive hashing finds candidate pairs
   (documents whose signatures agree on every row of some band), and the estimated Jaccard similarity
   (the share of equal signature values) confirms them. The first document of each cluster is kept.

Exact duplicates are removed by content hash in the same global pass."""

from __future__ import annotations

import numpy as np

from lmkiln.data.filters import words_of


def shingles(text: str, n: int) -> list[str]:
    words = [w.lower() for w in words_of(text) if any(ch.isalnum() for ch in w)]
    if len(words) < n:
        return [" ".join(words)] if words else []
    return list({" ".join(words[i : i + n]) for i in range(len(words) - n + 1)})


def signatures(texts: list[str], ngram: int, num_perm: int, seed: int) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures."""
    from rensa import RMinHash

    if not texts:
        return np.zeros((0, num_perm), dtype=np.uint32)
    matrix = RMinHash.digest_matrix_from_token_sets([shingles(t, ngram) for t in texts], num_perm, seed)
    return np.asarray(matrix.to_rows(), dtype=np.uint32)


class LshIndex:
    """Feed signatures in order; `add` says whether one nearly duplicates a signature kept before it."""

    def __init__(self, num_perm: int, bands: int, threshold: float) -> None:
        if num_perm % bands:
            raise ValueError(f"num_perm {num_perm} must divide by bands {bands}")
        self.rows, self.threshold = num_perm // bands, threshold
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.kept: list[np.ndarray] = []

    def add(self, sig: np.ndarray) -> bool:
        """True if `sig` is a near duplicate of a kept signature (it is then not kept)."""
        keys = [sig[b * self.rows : (b + 1) * self.rows].tobytes() for b in range(len(self.buckets))]
        candidates = {i for table, key in zip(self.buckets, keys) for i in table.get(key, ())}
        for i in sorted(candidates):
            if np.count_nonzero(self.kept[i] == sig) >= self.threshold * sig.size:
                return True
        index = len(self.kept)
        self.kept.append(sig)
        for table, key in zip(self.buckets, keys):
            table.setdefault(key, []).append(index)
        return False
