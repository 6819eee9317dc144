"""One run over several processes with torch.distributed (started by torchrun, or by ``trainer.devices=N``).

Every process trains on its own shard of each epoch (the same seeded permutation everywhere, sliced by
rank), gradients are averaged by DistributedDataParallel, and everything a table reports is summed over
the processes (exact counts, never an average of per-process averages). Process 0 alone writes files;
the others wait for it where it builds caches. With one process (``SINGLE``) every call here is free.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.utils.data import Sampler

TIMEOUT = dt.timedelta(minutes=10)  # a collective that waits longer means another process is gone


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives run: the CPU for gloo, this process's GPU for nccl

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every process, in place (on the CPU for gloo, the device for nccl)."""
        if self.active:
            moved = tensor.to(self.device)
            torch_dist.all_reduce(moved, op=torch_dist.ReduceOp.SUM)
            tensor.copy_(moved)
        return tensor

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (picklable), in rank order, on every process."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world
        torch_dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Process 0's ``value`` on every process."""
        if not self.active:
            return value
        box = [value]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def copy_buffers(self, module: torch.nn.Module) -> None:
        """Process 0's buffers (BatchNorm running statistics ...) into every process's ``module``. DDP sends
        them at each forward, so after an epoch's last step each process holds its own last update: without
        this, each would evaluate its shard with slightly different statistics than the checkpoint holds."""
        if self.active:
            for buffer in module.buffers():
                moved = buffer.data.to(self.device)
                torch_dist.broadcast(moved, src=0)
                buffer.data.copy_(moved)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Process 0 runs the block first (building caches: decoded images, token ids, features, a source
        model), then the others, which find what it wrote."""
        if not self.main:
            self.barrier()
        try:
            yield
        finally:
            if self.main:
                self.barrier()


SINGLE = Dist()


def launched() -> bool:
    """True inside a process that torchrun (or ``trainer.devices``) started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment: gloo on the CPU, nccl on CUDA (each
    process on the GPU of its local rank). Returns SINGLE and ``device`` outside torchrun."""
    if not launched():
        return SINGLE, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return Dist(rank, world, local, str(device) if device.type == "cuda" else "cpu"), device


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


class Shard(Sampler[int]):
    """This process's part of ``base``'s order: every ``world``-th index from ``rank``. ``even``: every
    process gets the same count (the tail that does not divide evenly is left out of this epoch, as
    DistributedSampler's drop_last does), so all take the same number of steps; otherwise (evaluation)
    every index is served exactly once over the processes."""

    def __init__(self, base: Sampler[int], dist: Dist, even: bool) -> None:
        self.base, self.dist, self.even = base, dist, even

    def __len__(self) -> int:
        count = len(self.base)
        if self.even:
            return count // self.dist.world
        return len(range(self.dist.rank, count, self.dist.world))

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        end = len(order) // self.dist.world * self.dist.world if self.even else len(order)
        yield from order[self.dist.rank:end:self.dist.world]
