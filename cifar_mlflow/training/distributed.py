"""Data-parallel training under torchrun: process-group set-up from torchrun's environment (gloo on CPU, nccl on
CUDA), and the few collectives the job needs. Knows nothing of MLflow; only rank 0 ever talks to it.

    torchrun --standalone --nproc_per_node=2 -m entrypoints.train --epochs 20
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cifar_mlflow.errors import ConfigError


@dataclass(frozen=True)
class Context:
    """This process's place in the group. batch_size in the config is global: each process takes
    batch_size / world, so the LR recipe means the same whatever the number of processes."""

    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_batch_size(batch_size: int) -> None:
    """Before any work: the global batch must split evenly over the processes."""
    world = world_size()
    if world > 1 and batch_size % world:
        raise ConfigError(
            f"batch_size={batch_size} is not allowed with {world} processes: expected a multiple of "
            f"{world} (each process takes batch_size/{world} images per step)"
        )


def setup() -> Context | None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); None when the
    job runs as a single process. nccl where every process has a GPU of its own, gloo on CPU."""
    world = world_size()
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > local_rank else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Context(rank, world, local_rank, backend)


def teardown(ctx: Context | None) -> None:
    if ctx is not None and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather(t: torch.Tensor, world: int) -> torch.Tensor:
    """(world, *t.shape): every process's t, in rank order."""
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return torch.stack(out)


def gather_objects(obj: Any, world: int) -> list[Any]:
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0's obj on every process (the others pass None)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics everywhere. DDP sends them before each training forward, but each process
    then updates its own copy: evaluation and the checkpoint must all use the same (rank 0's)."""
    for buf in model.buffers():
        dist.broadcast(buf, src=0)
