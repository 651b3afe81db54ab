"""Weights kept quantized, in two layouts, on disk and in memory:

- **int8**: one int8 per weight, symmetric, one scale per output row: w = q * scale.
- **int4**: one 4-bit code per weight (two per byte, the even column in the low nibble), in groups of 32
  along the input, each group with a scale and a minimum: w = code * scale + min. GGUF's Q4_0, Q4_1
  and Q4_K blocks are exactly this (their codes, scales and minimums are read as they are); what
  `kiln quantize` makes is its symmetric case, min = -8 * scale.

On disk, in lmkiln's layout (`kiln import` of a quantized GGUF), a quantized linear's `X.weight` becomes
`X.weight_int8` + `X.weight_scale`, or `X.weight_int4` + `X.weight_scale` + `X.weight_min` (scales and
minimums in float32, so a GGUF's values dequantize bit for bit as llama.cpp's own reader does);
`kiln quantize` writes compressed-tensors' layout of the same pieces (model/io/compressed.py). In memory
the matmul dequantizes inside PyTorch's weight-only kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`), given bfloat16 inputs: those kernels are vectorised for bf16 and not for
fp32 on CPU (measured: 19 us against 576 us for a 1536x576 product at batch 1). Everything else (norms,
attention, the residual stream, the KV cache) stays float32, which on CPU is also the faster type for
those small operations. A long prefill dequantizes a weight to bf16 for one matmul instead, which beats
the kernels from about 32 rows (int8) and 128 rows (int4); a compiled one-row int8 product is a sum over
the input in fp32, which inductor streams at twice the int8 kernel's speed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32  # int4 group size along the input: GGUF's block
KERNEL_ROWS = 32  # int8: up to this many rows the weight-only kernel; more rows, one dequantized matmul
# int4: likewise past 128 rows. The int4 kernel's time grows with the rows (82 ms for SmolLM2's blocks at
# 64 rows, 1.75 s at 1,440), a dequantized bf16 matmul's barely (137 ms, 275 ms): a long prefill, or a
# server's prompts prefilled together, take that
INT4_KERNEL_ROWS = 128
KERNEL_DTYPE = torch.bfloat16  # what the kernels take and give; a quantized model's activations stay fp32
LAYOUTS = ("int8", "int4")
PACK_ROWS = 4096  # a multiple of the int4 kernel's row blocks (64), so packing by parts equals packing whole


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale float32 (N,)) with w ~ q * scale, symmetric per row."""
    w = w.float()
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 (N, K/2), scale (N, K/32), min (N, K/32)) with w ~ code * scale + min, symmetric in
    each group of 32: min = -8 * scale, so w ~ (code - 8) * scale with the group's largest magnitude at
    7.5 steps (compressed-tensors' int4, which transformers reads; GGUF's Q4_1 holds it exactly too)."""
    n, k = w.shape
    groups = w.float().reshape(n, k // GROUP, GROUP)
    scale = (groups.abs().amax(-1) / 7.5).clamp(min=1e-12)
    codes = (torch.round(groups / scale[..., None]).clamp_(-8, 7) + 8).to(torch.uint8)
    return pack_nibbles(codes.reshape(n, k)), scale, -8 * scale


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) bytes, the even column in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) bytes -> (N, K) codes 0..15 (pack_nibbles undone)."""
    return torch.stack((packed & 15, packed >> 4), -1).reshape(packed.shape[0], -1)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    codes = unpack_nibbles(packed).to(torch.float32)
    n, k = codes.shape
    w = codes.view(n, k // GROUP, GROUP) * scale.float()[..., None] + minimum.float()[..., None]
    return w.reshape(n, k).to(dtype)


class Int8Linear(nn.Module):
    """A linear layer holding int8 weights and a bf16 scale per output row."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("weight_scale", scale.to(KERNEL_DTYPE))
        self.register_buffer("row_scale", scale.float(), persistent=False)  # the stored scale, unrounded
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        # None: the input's dtype back; a layer whose output only meets fp32 in a sum may stay bf16
        self.out_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows == 1 and x.is_cpu and torch.compiler.is_compiling():
            # one row, compiled: a sum over the input in fp32, which inductor makes one loop streaming
            # the codes at the memory's bandwidth (27 GB/s here, twice the kernel below; the decode
            # step's compile options keep the input's norm out of that loop: generate._decode_step)
            y, dtype = (x.reshape(1, -1).float() * self.weight_int8.float()).sum(-1) * self.row_scale, x.dtype
        else:
            x2 = x.reshape(rows, self.in_features).to(KERNEL_DTYPE).contiguous()
            if x.is_cpu and rows <= KERNEL_ROWS:
                y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.weight_scale)
            else:
                y = F.linear(x2, self.weight_int8.to(KERNEL_DTYPE) * self.weight_scale[:, None])
            dtype = self.out_dtype or x.dtype
        y = y.view(*x.shape[:-1], self.out_features).to(dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """A linear layer holding 4-bit codes in groups of 32 with a scale and a minimum each. On CPU the
    codes live in the layout PyTorch's int4 kernel packs them into (tinygemm's w = (code - 8) * s + z,
    so z = min + 8 * scale); elsewhere in the on-disk layout, dequantized for each product."""

    def __init__(
        self, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        if packed.is_cpu:  # packed a few thousand rows at a time: the kernel's int32 input is 8x the bytes
            chunks = [
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(part).to(torch.int32), 1)
                for part in packed.split(PACK_ROWS)
            ]
            self.register_buffer("weight_packed", torch.cat(chunks) if len(chunks) > 1 else chunks[0])
            zero = minimum.float() + 8 * scale.float()
            pairs = torch.stack((scale.float().t(), zero.t()), -1)  # (K/32, N, 2)
            self.register_buffer("scales_and_zeros", pairs.to(KERNEL_DTYPE).contiguous())
        else:
            self.register_buffer("weight_int4", packed)
            self.register_buffer("weight_scale", scale.float())
            self.register_buffer("weight_min", minimum.float())
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        # None: the input's dtype back; a layer whose output only meets fp32 in a sum may stay bf16
        self.out_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features).to(KERNEL_DTYPE).contiguous()
        if hasattr(self, "weight_packed") and x.is_cpu:
            if rows > INT4_KERNEL_ROWS and self.out_features % 64 == 0:
                y = F.linear(x2, self._dequantized())
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_packed, GROUP, self.scales_and_zeros)
        else:
            y = F.linear(x2, dequantize_int4(self.weight_int4, self.weight_scale, self.weight_min, KERNEL_DTYPE))
        y = y.view(*x.shape[:-1], self.out_features).to(self.out_dtype or x.dtype)
        return y if self.bias is None else y + self.bias

    def _dequantized(self) -> torch.Tensor:
        """The bf16 weight from the kernel's layout: per block of 64 rows, (K, 32) bytes, the low nibble
        of byte j holding row j and the high nibble row 32 + j (as `_convert_weight_to_int4pack_for_cpu`
        packs them; tests/model/test_quant.py checks it against the kernel)."""
        n, k = self.out_features, self.in_features
        blocks = self.weight_packed.view(n // 64, k, 32)
        codes = torch.cat((blocks & 15, blocks >> 4), -1).transpose(1, 2).reshape(n, k // GROUP, GROUP)
        scale, zero = (t.t()[..., None] for t in self.scales_and_zeros.unbind(-1))  # (N, K/32, 1) each
        return ((codes.to(KERNEL_DTYPE) - 8) * scale + zero).view(n, k)


class QuantEmbedding(nn.Module):
    """An embedding table kept quantized: the rows looked up are dequantized (to fp32), the rest never."""

    def __init__(self, layout: str, pieces: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.layout = layout
        for name, tensor in pieces.items():
            self.register_buffer(name, tensor)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        if self.layout == "int8":
            rows = dequantize_int8(self.weight_int8[flat], self.weight_scale[flat])
        else:
            rows = dequantize_int4(self.weight_int4[flat], self.weight_scale[flat], self.weight_min[flat])
        return rows.view(*idx.shape, -1)


PIECES = {"int8": ("weight_int8", "weight_scale"), "int4": ("weight_int4", "weight_scale", "weight_min")}


PIECE_NAMES = frozenset(p for pieces in PIECES.values() for p in pieces)


def stored_piece(name: str) -> tuple[str, str] | None:
    """A stored tensor name -> (module path, piece) for a piece of a quantized weight, else None."""
    path, _, leaf = name.rpartition(".")
    return (path, leaf) if leaf in PIECE_NAMES else None


def layout_of(pieces) -> str | None:
    """The layout a complete set of piece names makes, else None (still incomplete, or mixed)."""
    return next((layout for layout, names in PIECES.items() if set(pieces) == set(names)), None)


def piece_shapes(layout: str, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The stored pieces of an (N, K) weight in `layout`: name -> (shape, dtype)."""
    n, k = shape
    if layout == "int8":
        return {"weight_int8": ((n, k), torch.int8), "weight_scale": ((n,), torch.float32)}
    return {
        "weight_int4": ((n, k // 2), torch.uint8),
        "weight_scale": ((n, k // GROUP), torch.float32),
        "weight_min": ((n, k // GROUP), torch.float32),
    }


def quantize_pieces(layout: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A dense (N, K) weight's stored pieces in `layout`."""
    if layout == "int8":
        q, scale = quantize_int8(w)
        return {"weight_int8": q, "weight_scale": scale}
    packed, scale, minimum = quantize_int4(w)
    return {"weight_int4": packed, "weight_scale": scale, "weight_min": minimum}


def dequantize_pieces(layout: str, pieces: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    if layout == "int8":
        return dequantize_int8(pieces["weight_int8"], pieces["weight_scale"], dtype)
    return dequantize_int4(pieces["weight_int4"], pieces["weight_scale"], pieces["weight_min"], dtype)


def quant_linear(layout: str, pieces: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> nn.Module:
    if layout == "int8":
        return Int8Linear(pieces["weight_int8"], pieces["weight_scale"], bias)
    return Int4Linear(pieces["weight_int4"], pieces["weight_scale"], pieces["weight_min"], bias)


def concat_pieces(layout: str, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Several weights' pieces stacked by output rows: one matmul for q, k and v (or gate and up)."""
    return {name: torch.cat([p[name] for p in parts]) for name in PIECES[layout]}
