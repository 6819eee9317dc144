"""Loaders: whole batches cut from an in-memory uint8 tensor (the fast path), or per-sample decoding.

The in-memory path hands the DataLoader a batch sampler and a dataset that returns a whole batch per
index list: no per-sample Python and no collate, while ``drop_last`` and pinned memory stay the
DataLoader's. Both paths shuffle with the same ``EpochShuffle``, so a run sees the same order on either
path and a resumed run restores it. Batches are moved to the device first and augmented there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from transfer_cli.engine.distributed import SINGLE, Dist, Shard

# Data that fits this share of free GPU memory is moved there once; each batch is then a device gather.
_DEVICE_SHARE = 0.25


class Rows(Dataset):
    """Samples of an in-memory tensor (images or token ids), indexed by a list of positions: returns
    (samples, labels) of all of them at once."""

    def __init__(self, tensor: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> None:
        self.tensor, self.rows, self.labels = tensor, rows, labels

    def to(self, device: torch.device) -> None:
        self.tensor, self.rows = self.tensor.to(device), self.rows.to(device)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        at = torch.as_tensor(positions, dtype=torch.long)
        return torch.index_select(self.tensor, 0, self.rows[at.to(self.rows.device)]), self.labels[at]


class EpochShuffle(Sampler[int]):
    """A fresh permutation each epoch from ``generator`` alone. DataLoader's own shuffling also draws a
    worker seed from its generator whenever it makes a new iterator, which persistent workers make only
    once: the order would then depend on the worker setting and would not resume exactly."""

    def __init__(self, count: int, generator: torch.Generator) -> None:
        self.count, self.generator = count, generator

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.count, generator=self.generator).tolist()


class LengthGrouped(EpochShuffle):
    """A fresh permutation each epoch, regrouped so that each batch holds texts of similar length: the
    permutation is cut into pools of ``pool`` batches, each pool sorted by length and cut into batches, and
    the batches are shuffled. Padding to a batch's longest text then costs little (about half the compute
    of random batches on short sentences), while which texts meet in a batch stays random."""

    def __init__(self, lengths: torch.Tensor, batch_size: int, generator: torch.Generator, pool: int = 50) -> None:
        super().__init__(len(lengths), generator)
        self.lengths, self.batch_size, self.pool = lengths, batch_size, pool

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.count, generator=self.generator)
        span = self.batch_size * self.pool
        batches = []
        for start in range(0, self.count, span):
            chunk = order[start:start + span]
            chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += list(chunk.split(self.batch_size))
        full = [b for b in batches if len(b) == self.batch_size]
        ragged = [b for b in batches if len(b) != self.batch_size]  # kept last: drop_last drops only them
        for i in torch.randperm(len(full), generator=self.generator).tolist():
            yield from full[i].tolist()
        for batch in ragged:
            yield from batch.tolist()


class Batches:
    """(images, labels) batches on ``device``: what the training code asks of a loader (``len``,
    ``batch_size``, ``dataset`` and the shuffling ``generator``, which a resumed run restores).

    In memory (``rows``/``labels`` given): the DataLoader gets a batch sampler and a dataset that returns a
    whole batch per list of positions, and each batch is augmented on the device by ``augment``.
    Otherwise every sample is decoded and transformed by ``dataset`` itself, in ``workers`` processes.
    ``lengths`` (texts' token counts): shuffled batches group texts of similar length (``LengthGrouped``).
    ``dist``: several processes each take their shard of every epoch (see engine/distributed.py).
    ``persistent``: worker processes outlive an epoch (for loaders read every epoch); ``close`` ends them."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 device: torch.device, augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 workers: int = 0, lengths: torch.Tensor | None = None, dist: Dist = SINGLE,
                 persistent: bool = False) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        count = len(dataset)
        order = SequentialSampler(range(count))
        if shuffle:
            order = EpochShuffle(count, self.generator) if lengths is None else \
                LengthGrouped(lengths, batch_size, self.generator)
        if dist.active:  # this process's share: equal shares when training, every sample once when evaluating
            order = Shard(order, dist, even=shuffle)
        pin = device.type == "cuda"
        if isinstance(dataset, Rows):
            if pin and dataset.tensor.nbytes < _DEVICE_SHARE * torch.cuda.mem_get_info(device)[0]:
                dataset.to(device)
            pin = pin and dataset.tensor.device.type == "cpu"
            self.loader = DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last), batch_size=None,
                                     pin_memory=pin)
        else:
            self.loader = DataLoader(dataset, batch_size=batch_size, sampler=order, drop_last=drop_last,
                                     num_workers=workers, persistent_workers=workers > 0 and persistent, pin_memory=pin,
                                     generator=torch.Generator().manual_seed(seed + 1))  # worker seeds only
        self.dataset, self.batch_size, self.device, self.augment = dataset, batch_size, device, augment
        self.dist = dist

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        """End persistent workers now. Left to the garbage collector, their shutdown (a join of each worker)
        happens at some later allocation: inside a sweep's next job, or a later test."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()  # DataLoader offers no public call for this
            self.loader._iterator = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            yield (self.augment(images) if self.augment else images), labels.to(self.device, non_blocking=True)


def resolve_workers(value: str | int) -> int:
    """``dataset.num_workers``: an integer, or auto = one worker per core but one (for the training process)."""
    if str(value) == "auto":
        return max(0, usable_cores() - 1)
    return int(value)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

