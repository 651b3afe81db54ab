"""What the training-throughput benches against transformers share (mlm_vs_hf.py, t5_vs_hf.py, and
pretrain_vs_hf.py's optimizer step): one optimizer step the same on both sides; steps alternating between
the two sides, so load on the machine falls on both alike; the result as a table and a last line of
key=value figures."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from lmkiln.train.speed import device_peak, mfu


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    """Backward, clip at 1.0, step and clear: the same update for both sides; the loss, for timing."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _timed(step: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    step().item()  # the loss's value: the step has finished
    return time.perf_counter() - start


def time_interleaved(ours, theirs, warmup: int, steps: int) -> tuple[float, float]:
    """Median seconds per step of each side, over `steps` timed steps after `warmup` untimed ones."""
    for _ in range(warmup):
        ours(), theirs()
    t_ours, t_theirs = [], []
    for _ in range(steps):
        t_ours.append(_timed(ours))
        t_theirs.append(_timed(theirs))
    return statistics.median(t_ours), statistics.median(t_theirs)


def print_comparison(header: str, tokens: int, s_ours: float, s_theirs: float, flops_per_token: float) -> None:
    """The model line, a tokens/s, s/step and MFU row per side, and `tokens_per_s ... ratio=X`."""
    peak, source = device_peak(torch.device("cpu"))
    tps_ours, tps_theirs = tokens / s_ours, tokens / s_theirs
    util, util_theirs = mfu(tps_ours, flops_per_token, peak), mfu(tps_theirs, flops_per_token, peak)
    print(f"{header}, cpu, threads {torch.get_num_threads()}, peak {peak / 1e9:,.0f} GFLOP/s ({source})")
    print(f"{'':14} {'tokens/s':>10} {'s/step':>8} {'MFU':>6}")
    print(f"{'lmkiln':14} {tps_ours:10,.0f} {s_ours:8.3f} {util or 0:6.1%}")
    print(f"{'transformers':14} {tps_theirs:10,.0f} {s_theirs:8.3f} {util_theirs or 0:6.1%}")
    print(f"tokens_per_s lmkiln={tps_ours:.0f} hf={tps_theirs:.0f} ratio={tps_ours / tps_theirs:.3f}")
