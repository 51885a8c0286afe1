"""PyTorch DistributedDataParallel set-up from the environment torchrun provides.

Run ``torchrun --nproc_per_node=G -m DADRNLesionLib train ...`` on one machine, or with
``--nnodes/--node_rank/--rdzv_endpoint`` on several: torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK, and `setup` joins the process group (NCCL for GPUs, gloo for CPUs). Without those
variables everything runs as a single process and the helpers are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "setup", "teardown", "all_reduce_sum", "all_gather_objects", "barrier", "broadcast_object"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device, timeout_minutes: float = 60.0) -> tuple[DistEnv, torch.device]:
    """Join the process group when launched by torchrun; returns the env and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"local rank {local_rank} has no GPU (this node sees {torch.cuda.device_count()})")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return DistEnv(rank, world, local_rank, backend), device


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
