"""Deterministic held-out splits by group (module, file, row), stable across machines and runs."""

from __future__ import annotations

import hashlib


def unit_hash(key: str, salt: str = "") -> float:
    """A stable number in [0, 1) for a key: the same module lands in the same split everywhere."""
    digest = hashlib.sha1(f"{salt}{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(group: str, fraction: float, salt: str = "") -> bool:
    return unit_hash(group, salt) < fraction
