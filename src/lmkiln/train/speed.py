"""Throughput and model FLOPs utilisation (MFU): achieved FLOP/s over the device's peak.

GPU peaks come from a table of dense bf16 figures (the vendor's datasheets, without sparsity); a CPU's
peak is measured at start by a large fp32 matrix product, so MFU on CPU reads "share of what this
machine's matmul can do".
"""

from __future__ import annotations

import time

import torch

GPU_PEAK_BF16 = {  # TFLOP/s, dense
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}

_cpu_peak: float | None = None


def measure_cpu_peak(n: int = 1024, seconds: float = 0.5) -> float:
    """fp32 FLOP/s of an n×n matrix product on this CPU with torch's current thread count: the fastest
    of the products run in `seconds` (at least three), since a peak is what the machine can do, and a
    mean would take in whatever else ran meanwhile (which read as MFU over 100%)."""
    global _cpu_peak
    if _cpu_peak is None:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best, reps, start = float("inf"), 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - start < seconds:
            t = time.perf_counter()
            a @ b
            best, reps = min(best, time.perf_counter() - t), reps + 1
        _cpu_peak = 2 * n**3 / best
    return _cpu_peak


def device_peak(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, how it was found) for one device; None when unknown."""
    if device.type == "cpu":
        return measure_cpu_peak(), "measured fp32 matmul"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):
            if key in name:
                return GPU_PEAK_BF16[key], f"{key} bf16 datasheet"
        return None, f"unknown GPU '{name}'"
    return None, f"no peak known for {device.type}"


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, devices: int = 1) -> float | None:
    return None if not peak else tokens_per_s * flops_per_token / (peak * devices)
