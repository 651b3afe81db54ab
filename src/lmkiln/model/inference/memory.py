"""Giving freed memory back to the OS, for processes whose resident size is watched (`kiln serve`)."""

from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS. glibc keeps them otherwise: a load reads each tensor
    through buffers it then drops, a prefill's activations are freed after it, and a grown cache frees
    its smaller tensors, none of which a server's resident memory should go on counting."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass
