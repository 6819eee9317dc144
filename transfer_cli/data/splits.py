"""What every dataset builder returns, and the helpers builders share."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset

from transfer_cli.registry import Registry


class InMemory(Dataset):
    """Samples held in memory as one tensor (``tensor``, a row per sample) with their labels: what every
    in-memory path (batches cut by index, feature caches, identity digests) reads, images or token ids."""

    def __init__(self, tensor: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> None:
        self.tensor = tensor
        self.targets = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.tensor[index], int(self.targets[index])


class TensorImages(InMemory):
    """Images held in memory as one uint8 tensor [N, C, H, W]; the fast path for small datasets."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 [N, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
        super().__init__(images, labels)

    @property
    def images(self) -> torch.Tensor:
        return self.tensor


@dataclass
class DataSplits:
    """Raw splits (samples not yet transformed) plus what the model and transforms need to know."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    channels: int  # 0 for text
    size: tuple[int, int] | None  # every sample's (H, W) when fixed; None when images vary in size (and for text)
    skipped: int = 0  # files found but not readable as images; rows of a text table that cannot be used
    notes: list[str] = field(default_factory=list)  # what the builder dropped or changed, for the run log
    text: bool = False  # samples are strings, which a text backbone tokenizes
    # The train split before dataset.shots / dataset.fraction drew the labelled part: what an unsupervised
    # preprocessing (a TF-IDF vocabulary) may be fitted on, labels unused. None: the train split itself.
    pool: Dataset | None = None
    # The pool's samples that draw left out, their labels never read: what method=distill's unlabelled=true
    # shows the teachers and the student. None when nothing was drawn.
    unlabelled: Dataset | None = None

    @property
    def kind(self) -> str:
        return "text" if self.text else "images"

    def split(self, name: str) -> Dataset:
        return {"train": self.train, "val": self.val, "test": self.test, "unlabelled": self.unlabelled}[name]


# name -> builder(cfg: DatasetConfig) -> DataSplits
DATASETS = Registry("dataset")


def targets_of(dataset: Dataset) -> np.ndarray:
    """Labels of a dataset without decoding its images."""
    for attr in ("targets", "labels", "_labels"):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr))
    if isinstance(dataset, Subset):
        return targets_of(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    return np.asarray([label for _, label in dataset])


def base_of(dataset: Dataset) -> Dataset:
    """The dataset at the bottom of a chain of subsets (class subsets, few-shot draws, carved splits)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def with_base(dataset: Dataset, replace: Callable[[Dataset], Dataset]) -> Dataset:
    """``dataset`` with the dataset at the bottom of its subset chain replaced by ``replace(base)``
    (decoded images or token ids in place of the files or texts they came from)."""
    if not isinstance(dataset, Subset):
        return replace(dataset)
    outer = copy.copy(dataset)
    outer.dataset = with_base(dataset.dataset, replace)
    return outer


def tensor_view(dataset: Dataset) -> tuple[InMemory, torch.Tensor, torch.Tensor] | None:
    """(in-memory base, its row of every sample, every sample's label) for an ``InMemory`` dataset seen through
    any chain of subsets (class subsets, few-shot draws, carved splits); None for other datasets."""
    base = base_of(dataset)
    if not isinstance(base, InMemory):
        return None
    rows, outer = None, dataset
    while isinstance(outer, Subset):
        picked = torch.as_tensor(outer.indices, dtype=torch.long)
        rows = picked if rows is None else picked[rows]
        outer = outer.dataset
    rows = torch.arange(len(base)) if rows is None else rows
    return base, rows, torch.as_tensor(targets_of(dataset), dtype=torch.long)


def stratified_split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split off ``fraction`` of ``dataset`` with the class proportions kept, reproducibly."""
    if fraction <= 0:
        return dataset, Subset(dataset, [])
    labels = targets_of(dataset)
    keep, held = train_test_split(
        np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed
    )
    return Subset(dataset, np.sort(keep).tolist()), Subset(dataset, np.sort(held).tolist())


class Transformed(Dataset):
    """Applies a per-sample transform to the image of another dataset's (image, label) pairs."""

    def __init__(self, dataset: Dataset, transform: Callable | None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return (self.transform(image) if self.transform else image), label
