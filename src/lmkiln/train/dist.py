"""Scale-out on PyTorch's own engine: the same command under `torchrun --nproc_per_node N` uses DDP, or
FSDP2 (`fully_shard`) with `pretrain.strategy=fsdp`. NCCL on CUDA, gloo on CPU.

Checkpoints hold full (unsharded) state dicts gathered on rank 0, so a run resumes on any number of
ranks, or on one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmkiln.device import pick_device
from lmkiln.errors import UserError


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device_name: str) -> DistContext:
    """Join the process group torchrun describes in the environment, or run as one process."""
    from lmkiln.runs import rank as torchrun_rank

    rank, world = torchrun_rank()
    device = pick_device(device_name)
    if world == 1:
        return DistContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=device)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        # A barrier first: without it FSDP2 processes sometimes abort at exit on gloo.
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, strategy: str, ctx: DistContext) -> nn.Module:
    if not ctx.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "args") else model


def is_sharded(model: nn.Module) -> bool:
    """FSDP2: parameters are whole only inside the model's own forward and backward."""
    return hasattr(model, "set_requires_gradient_sync")


def grad_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_state(model: nn.Module, opt) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts on CPU (collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizers = list(opt.optimizers.values())
    model_state = get_model_state_dict(model, options=options)
    optim_state = {
        name: get_optimizer_state_dict(model, o, options=options) for name, o in zip(opt.optimizers, optimizers)
    }
    return model_state, optim_state


def load_full_state(model: nn.Module, opt, model_state: dict, optim_state: dict | None) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_state, options=options)
    if optim_state is not None:
        for name, o in opt.optimizers.items():
            if name not in optim_state:
                raise UserError(
                    f"checkpoint has no state for optimizer '{name}': resume with the optimizer it was made with"
                )
            set_optimizer_state_dict(model, o, optim_state_dict=optim_state[name], options=options)


def all_mean(value: float, ctx: DistContext) -> float:
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.item() / ctx.world


def all_sum(values: list[float], ctx: DistContext) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
