"""Running recovery under ``torchrun``: who this process is and which part of a batch it takes.

Under ``torchrun --nproc_per_node=N`` every process calls :func:`serfswap.recover` with the
same data; each batch is a *global* batch that every rank cuts into N near-equal slices along
the first dimension and takes its own, and DistributedDataParallel averages the gradients. With
losses that are means over examples this is the gradient of the whole batch, so N processes
follow the single-process run of the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class World:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    started_here: bool = False  # recover() created the process group and must destroy it

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and plots."""
        return self.rank == 0


def join(device: torch.device) -> World:
    """The current process group, or a new one when launched by ``torchrun`` without one
    (NCCL for CUDA models, gloo otherwise)."""
    if not dist.is_available():
        return World()
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), started_here=True)


def leave(world: World) -> None:
    if world.started_here and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: Any, world: World) -> Any:
    """This rank's slice of a global batch: every tensor whose first dimension is the batch's
    is cut into ``world.size`` near-equal parts. A batch of fewer examples than ranks is
    refused (on every rank alike: each holds the same global batch): a rank with none would
    fail inside the model, or hang its collectives."""
    if world.size == 1:
        return batch
    size = _batch_size(batch)
    if size is not None and size < world.size:
        raise InvalidArgumentError(
            f"a global batch of {size} example(s) cannot be split among {world.size} ranks: "
            f"each needs at least one (a batch size of at least {world.size}; the last batch "
            f"of a pass may be smaller)"
        )

    def cut(obj: Any) -> Any:
        if isinstance(obj, Tensor) and obj.dim() > 0 and obj.shape[0] == size:
            return obj.tensor_split(world.size)[world.rank]
        if isinstance(obj, dict):
            return {k: cut(v) for k, v in obj.items()}
        if isinstance(obj, tuple | list):
            return type(obj)(cut(v) for v in obj)
        return obj

    return cut(batch)


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else None
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, Tensor) and value.dim():
            return value.shape[0]
    return None


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (so that all resume from the same checkpoint)."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    boxes: list[Any] = [None] * world.size
    dist.all_gather_object(boxes, obj)
    return boxes


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
