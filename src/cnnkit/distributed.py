"""Data-parallel training with torch.distributed, launched by torchrun (or `cnnkit train --nproc N`).

One process per GPU (NCCL) or per CPU share (Gloo). Every rank runs the same training loop on its
shard of each global batch; DDP averages the gradients, so a step equals a single-process step on
the whole global batch. Rank 0 alone prints and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group that torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def refusal(strategy: str) -> str | None:
    """Why a run of this strategy cannot train data-parallel (None where it can): said before torchrun
    starts (`cnnkit train --nproc`) and again in each worker of a torchrun launched by hand."""
    if strategy == "auto":
        return ("--strategy auto trains its candidates one after another in one process; run it without torchrun "
                "(--nproc), or name a strategy")
    if strategy in ("finetune", "gradual"):
        return (f"--strategy {strategy} changes which layers train during the run, which DistributedDataParallel "
                "does not allow; run it in one process, or use --strategy full")
    return None


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's value of obj, on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_cat(tensor: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Every rank's tensor (any length), on every rank, in rank order."""
    if not info.enabled:
        return [tensor]
    parts: list[Any] = [None] * info.world
    dist.all_gather_object(parts, tensor.cpu())
    return parts


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when it is true on some rank (e.g. a signal arrived at one of them)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_all(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def max_all(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The elementwise maximum of every rank's tensor (same shape), on every rank."""
    if not info.enabled:
        return tensor
    t = tensor.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group, all ranks together: a rank that tore Gloo down on its own while
    rank 0 was still saving aborted once in CI ("terminate called without an active exception")."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
