"""Near-duplicate removal: MinHash signatures of word n-gram shingles (rensa, in Rust), banded LSH to
find candidate pairs, and a check of the estimated Jaccard similarity; the first document of each
cluster is kept. Exact duplicates are removed earlier, by content hash, while documents stream."""

from __future__ import annotations

from lmkiln.data.filters import words_of


def shingles(text: str, n: int) -> list[str]:
    words = [w.lower() for w in words_of(text) if any(ch.isalnum() for ch in w)]
    if len(words) < n:
        return [" ".join(words)] if words else []
    return list({" ".join(words[i:i + n]) for i in range(len(words) - n + 1)})


class NearDuplicates:
    """Feed documents in order; `add` says whether one nearly duplicates a document fed before it."""

    def __init__(self, num_perm: int, bands: int, ngram: int, threshold: float, seed: int = 1) -> None:
        from rensa import RMinHash, RMinHashLSH

        if num_perm % bands:
            raise ValueError(f"num_perm {num_perm} must divide by bands {bands}")
        self._make = lambda: RMinHash(num_perm=num_perm, seed=seed)
        self.lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=bands)
        self.ngram, self.threshold = ngram, threshold
        self.kept: dict[int, object] = {}

    def add(self, key: int, text: str) -> bool:
        """True if `text` is a near duplicate of a kept document (it is then not kept)."""
        sig = self._make()
        sig.update(shingles(text, self.ngram))
        for other in self.lsh.query(sig):
            if sig.jaccard(self.kept[other]) >= self.threshold:
                return True
        self.lsh.insert(key, sig)
        self.kept[key] = sig
        return False
