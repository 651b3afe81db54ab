"""Giving freed memory back to the OS, for processes whose resident size is watched (`kiln serve`)."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS. glibc keeps them otherwise: a load reads each tensor
    through buffers it then drops, a prefill's activations are freed after it, and a grown cache frees
    its smaller tensors (one layer at a time), none of which a server's resident memory should go on
    counting."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
