"""The one training loop, for pretraining, SFT, DPO and classification. A stage describes its run as a
`Plan` (which micro-batches make step i, what a micro-batch's loss is, the learning rate of step i) and
the loop does the rest the same way for all of them: gradient accumulation, clipping, non-finite steps,
the schedule, evaluation and early stopping, checkpoints and resume, the metrics log, and the loss,
tokens/s and MFU readout.

Step i's micro-batches are a pure function of i, so a checkpoint needs only the step number and the
loop's running means to continue exactly where a run that never stopped would be."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmkiln.errors import UserError
from lmkiln.log import console, progress
from lmkiln.train import dist
from lmkiln.train.checkpoint import stop_at_step_end
from lmkiln.train.metrics import Tracker
from lmkiln.train.speed import device_peak, mfu


@dataclass
class Plan:
    """What a stage gives the loop. Under torchrun `micro_batches(i)` is this rank's share of step i and
    `weight(i)` the whole step's, over all ranks: the step's loss is the sum of every micro-batch's summed
    loss over that weight (trained tokens, pairs, examples), so N ranks take the steps one process takes
    with N times the accumulation."""

    name: str  # the progress bar's label
    steps: int  # optimizer steps in the whole run
    micro_batches: Callable[[int], list]  # step -> this rank's micro-batches
    weight: Callable[[int], float]  # step -> what the step's summed loss is divided by
    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, int]]  # (forward, batch) -> (summed loss, tokens)
    lr: Callable[[int], float]  # step -> learning rate
    idle_batch: Callable[[int], Any] | None = None  # a batch a rank left without one runs at zero weight
    epoch: Callable[[int], int] | None = None  # step -> its epoch, for the log
    flops_per_token: float | None = None  # for MFU
    device: torch.device | None = None  # for MFU: whose peak
    prefetch: bool = False  # read the next step's batches on a thread while this one computes
    extras: Callable[[], dict] | None = None  # a stage's own figures for the interval, at each log record


@dataclass
class Cadence:
    """When the loop logs, evaluates and checkpoints, and what it does with a non-finite step."""

    log_every: int
    evaluate_at: Callable[[int], bool]  # step -> evaluate after it
    evaluate: Callable[[int, float], tuple[dict, bool]] | None  # (step, train loss since) -> (fields, stop)
    save: Callable[[int, dict], None] | None = None  # (step, loop state) -> a checkpoint
    checkpoint_every: int = 0
    grad_clip: float = 0.0
    on_nan: str = "stop"  # or "skip": drop the step's update
    key: str = "pretrain"  # the recipe section whose settings an error names
    stop_after: int | None = None  # a planned stop, as Ctrl-C stops
    on_step: Callable[[int], None] | None = None  # told each finished step (tests interrupt through it)


@dataclass
class LoopState:
    """What a checkpoint carries of the loop: the running means of the log interval and of the training
    loss since the last evaluation (a resumed run continues them)."""

    interval: list[float] = field(default_factory=list)
    since_eval: list[float] = field(default_factory=list)
    tokens: int = 0  # read so far, over all ranks


@dataclass
class Result:
    steps: int
    train_loss: float | None  # the mean of the last logged interval
    tokens_per_s: float | None  # the median over logged intervals
    mfu: float | None
    last_eval: dict | None
    started_at: int

    def metrics(self) -> dict:
        return {
            "steps": self.steps,
            "tokens_per_s": round(self.tokens_per_s, 1) if self.tokens_per_s else None,
            "resumed_from": self.started_at or None,
        }


class _Batches:
    """Step i's micro-batches; on an accelerator the next step's are read on a thread while this step
    computes (the sampler is a pure function of the step, so order and resume are unchanged)."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.pool, self.pending = plan, None, None

    def __call__(self, step: int) -> list:
        if not self.plan.prefetch:
            return self.plan.micro_batches(step)
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmkiln-loader")
        ready = self.pending[1].result() if self.pending is not None and self.pending[0] == step else None
        current = ready if ready is not None else self.plan.micro_batches(step)
        if step + 1 < self.plan.steps:
            self.pending = (step + 1, self.pool.submit(self.plan.micro_batches, step + 1))
        return current

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _step(
    plan: Plan,
    step: int,
    batches: list,
    net: nn.Module,
    model: nn.Module,
    opt,
    cadence: Cadence,
    ctx: dist.DistContext,
    stop_asked: bool,
) -> tuple[float, float, int, bool]:
    """One optimizer step: (loss, grad norm, tokens read over all ranks, stop asked on any rank)."""
    total = plan.weight(step)
    scale = ctx.world / total  # DDP and FSDP average gradients over ranks: this makes it the global sum
    loss_sum, tokens = 0.0, 0
    for k, batch in enumerate(batches):
        with dist.grad_sync(net, k == len(batches) - 1):
            loss, n = plan.loss(net, batch)
            (loss * scale).backward()
        loss_sum += loss.item()
        tokens += n
    if not batches:  # a short last step left this rank nothing: join the all-reduce with zeros
        loss, _ = plan.loss(net, plan.idle_batch(step))
        (loss * 0).backward()
    # a stop asked on any rank is a stop on all of them, at the same step
    loss_sum, asked, tokens = dist.all_sum([loss_sum, float(stop_asked), tokens], ctx)
    loss_val = loss_sum / total
    clip = cadence.grad_clip if cadence.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if math.isfinite(loss_val) and math.isfinite(norm):
        opt.step()
    elif cadence.on_nan == "stop":
        raise UserError(
            f"{plan.name}: loss became {loss_val} at step {step + 1}; the last checkpoint is kept. "
            f"Lower {cadence.key}.lr (now {plan.lr(step):.3g}) or set {cadence.key}.on_nan=skip"
        )
    else:
        console.print(f"[yellow]step {step + 1}: non-finite loss or gradient, batch skipped[/yellow]")
    opt.zero_grad(set_to_none=True)
    return loss_val, norm, int(tokens), bool(asked)


class _Readout:
    """The log interval under way: its running mean loss, tokens/s and MFU, shown on the bar from its first
    step and written to metrics.jsonl at its end (one small batch's loss is too noisy to read a curve from)."""

    def __init__(self, plan: Plan, state: LoopState, world: int) -> None:
        self.plan, self.state, self.world = plan, state, world
        self.peak = device_peak_of(plan)
        self.started, self.tokens = time.perf_counter(), 0
        self.rates: list[float] = []
        self.train_loss: float | None = None

    def add(self, loss: float, tokens: int) -> dict:
        """One step done: the bar's fields."""
        if math.isfinite(loss):
            self.state.interval.append(loss)
            self.state.since_eval.append(loss)
        self.tokens += tokens
        self.state.tokens += tokens
        self.tps = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.util = mfu(self.tps, self.plan.flops_per_token, self.peak, self.world) if self.peak else None
        self.mean = sum(self.state.interval) / len(self.state.interval) if self.state.interval else loss
        return {"loss": self.mean, "tps": self.tps, "mfu": f"{self.util:.0%}" if self.util is not None else "–"}

    def close(self, step: int, lr: float, norm: float) -> dict:
        """The interval ends at `step`: its record, and a new interval begins."""
        if not self.state.interval:
            return {}
        self.train_loss, self.started, self.tokens = self.mean, time.perf_counter(), 0
        self.state.interval.clear()
        self.rates.append(self.tps)
        return {
            "step": step,
            **epoch_of(self.plan, step),
            "loss": round(self.mean, 5),
            "lr": lr,
            "grad_norm": round(norm, 4),
            "tokens": self.state.tokens,
            "tokens_per_s": round(self.tps, 1),
            **({"mfu": round(self.util, 4)} if self.util is not None else {}),
            **(self.plan.extras() if self.plan.extras else {}),
        }

    def median_rate(self) -> tuple[float | None, float | None]:
        tps = statistics.median(self.rates) if self.rates else None
        return tps, (mfu(tps, self.plan.flops_per_token, self.peak, self.world) if tps and self.peak else None)


def device_peak_of(plan: Plan) -> float | None:
    return device_peak(plan.device)[0] if plan.flops_per_token else None


def epoch_of(plan: Plan, step: int) -> dict:
    return {"epoch": plan.epoch(step)} if plan.epoch else {}


def _evaluate(cadence: Cadence, state: LoopState, step: int) -> tuple[dict | None, bool]:
    """The evaluation hook, told the mean training loss since the last evaluation."""
    since = sum(state.since_eval) / max(len(state.since_eval), 1)
    state.since_eval.clear()
    return cadence.evaluate(step, since)


def _save_or_stop(plan: Plan, cadence: Cadence, state: LoopState, step: int, asked: bool) -> bool:
    """After a step: a checkpoint on the schedule or when a stop was asked for (a signal, `stop_after`),
    the step hook, then the stop itself (_Stopped). Returns whether it saved."""
    asked = asked or (cadence.stop_after is not None and step == cadence.stop_after < plan.steps)
    saved = cadence.save is not None and step < plan.steps and (asked or step % cadence.checkpoint_every == 0)
    if saved:
        cadence.save(step, _copy(state))
    if cadence.on_step is not None:
        cadence.on_step(step)
    if asked:
        kept = "checkpoint saved; run the same command again to resume" if cadence.save is not None else "nothing saved"
        console.print(f"interrupted at step {step}: {kept}")
        raise _Stopped
    return saved


def train(
    plan: Plan,
    cadence: Cadence,
    net: nn.Module,
    model: nn.Module,
    opt,
    ctx: dist.DistContext,
    track: Tracker,
    start: int = 0,
    state: LoopState | None = None,
) -> Result:
    """Run `plan` from step `start` (a resumed run passes the checkpoint's loop state). `net` runs the
    forward (DDP/FSDP-wrapped, maybe compiled); `model` owns the parameters. Ctrl-C or SIGTERM stops at
    the end of the step under way, saves a checkpoint and raises KeyboardInterrupt."""
    state = state or LoopState()
    readout, batches = _Readout(plan, state, ctx.world), _Batches(plan)
    step, last_eval, saved = start, None, start
    fields = "loss {task.fields[loss]:.3f} · {task.fields[tps]:,.0f} tok/s"
    model.train()
    try:
        with (
            progress(fields + (" · MFU {task.fields[mfu]}" if plan.flops_per_token else "")) as bar,
            stop_at_step_end() as stop,
        ):
            task = bar.add_task(plan.name, total=plan.steps, completed=start, loss=float("nan"), tps=0.0, mfu="–")
            while step < plan.steps:
                lr = plan.lr(step)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss, norm, tokens, asked = _step(plan, step, batches(step), net, model, opt, cadence, ctx, stop.asked)
                step += 1
                bar.update(task, completed=step, **readout.add(loss, tokens))
                record = readout.close(step, lr, norm) if step % cadence.log_every == 0 or step == plan.steps else {}
                stopping = False
                if cadence.evaluate is not None and cadence.evaluate_at(step):
                    last_eval, stopping = _evaluate(cadence, state, step)
                    record = {"step": step, **epoch_of(plan, step), **record, **last_eval}
                if record:
                    track(record)
                if stopping:
                    break
                if _save_or_stop(plan, cadence, state, step, asked):
                    saved = step
    except _Stopped:
        raise KeyboardInterrupt from None
    except KeyboardInterrupt:  # an interrupt from outside the step's end (a second Ctrl-C, a hook)
        if cadence.save is not None and step > saved:
            cadence.save(step, _copy(state))
            console.print(f"interrupted at step {step}: checkpoint saved; run the same command again to resume")
        raise
    finally:
        batches.close()
    model.eval()
    return Result(step, readout.train_loss, *readout.median_rate(), last_eval, start)


class _Stopped(Exception):
    """A stop the loop has already saved for."""


def _copy(state: LoopState) -> dict:
    return {"interval": list(state.interval), "since_eval": list(state.since_eval), "tokens": state.tokens}
