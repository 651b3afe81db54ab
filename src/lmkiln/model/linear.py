"""The model's Linear: nn.Linear with another CPU path for the few rows of a decode step, taken where it is faster."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 16  # up to this many input rows (decode steps), Linear on CPU takes the row-block path
ROW_BLOCKS = max(2, torch.get_num_threads())  # ...with a block per core (bmm runs its batch in parallel)


_ROW_BLOCKS_PAY: bool | None = None  # measured on first use: see row_blocks_pay


def _best_us(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times) * 1e6


def row_blocks_pay() -> bool:
    """Whether a one-row product streams its weight faster here as a batched product over row blocks
    than as F.linear. It depends on the CPU: on some, MKL runs a matrix-vector product on one core at
    about 7 GB/s and the row blocks are 1.5-3x faster; on AVX-512 cores with AMX its kernel streams
    46 GB/s over two cores and the row blocks are 3x slower. So it is measured once per process (about
    40 ms, on a 64 MB weight: larger than the caches, as a model's are)."""
    global _ROW_BLOCKS_PAY
    if _ROW_BLOCKS_PAY is None:
        with torch.no_grad():
            w, x = torch.full((16384, 1024), 0.5), torch.full((1, 1024), 0.25)
            blocks = w.view(ROW_BLOCKS, -1, 1024)
            plain = _best_us(lambda: F.linear(x, w))
            blocked = _best_us(lambda: torch.bmm(blocks, x.t().expand(ROW_BLOCKS, 1024, 1)))
        _ROW_BLOCKS_PAY = blocked < 0.9 * plain
    return _ROW_BLOCKS_PAY


class Linear(nn.Linear):
    """nn.Linear (same parameters and names), with another path for a few input rows on CPU, which is
    every decode step: the product as a batched one over row blocks of the weight, where this machine
    streams the weight faster that way (row_blocks_pay). Each output is still one dot product, so
    values agree with F.linear to float rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, (out, inp) = x.numel() // x.shape[-1], self.weight.shape
        if rows > FEW_ROWS or not x.is_cpu or out % ROW_BLOCKS or torch.is_grad_enabled() or not self._blocks_pay():
            return F.linear(x, self.weight, self.bias)
        blocks = self.weight.view(ROW_BLOCKS, out // ROW_BLOCKS, inp)
        y = torch.bmm(blocks, x.reshape(rows, inp).t().expand(ROW_BLOCKS, inp, rows))
        y = y.view(out, rows).t().reshape(*x.shape[:-1], out)
        return y if self.bias is None else y + self.bias

    @staticmethod
    def _blocks_pay() -> bool:
        # a compiled graph reads the measured answer (generate's _decode_step measures it first)
        return bool(_ROW_BLOCKS_PAY) if torch.compiler.is_compiling() else row_blocks_pay()
