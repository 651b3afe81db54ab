"""Safetensors read and written one tensor at a time, for conversions that must not hold a model twice.

The `safetensors` package writes a file from a dict of all its tensors, and reads through a memory
map whose touched pages stay resident until the file closes; converting a shard with it takes the
shard's size twice. The format is simple enough to stream: an 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets}}, then the tensors' bytes back to back."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """({name: {dtype, shape, data_offsets}}, where the data starts) of a safetensors file."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in file order, each read with one positioned read: nothing else stays in memory."""
    header, start = read_header(path)
    with open(path, "rb") as fh:
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = meta["data_offsets"]
            fh.seek(start + a)
            buf = bytearray(fh.read(b - a))
            tensor = (
                torch.frombuffer(buf, dtype=DTYPES[meta["dtype"]])
                if buf
                else torch.empty(0, dtype=DTYPES[meta["dtype"]])
            )
            yield name, tensor.reshape(meta["shape"])


def write_streamed(
    path: Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterator[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors (named and shaped by `specs`, in that order) come one at a
    time from `tensors`."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for (name, dtype, shape), tensor in zip(specs, tensors, strict=True):
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, header says {dtype} {list(shape)}")
            if tensor.numel():
                fh.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())  # a buffer: no copy
