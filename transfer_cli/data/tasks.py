"""Task construction on top of any dataset: class subsets (relabelled) and few-shot / fractional train sets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset, Subset

from transfer_cli.config import DatasetConfig
from transfer_cli.data.splits import DataSplits, stratified_split, targets_of
from transfer_cli.errors import UserError


class Relabeled(Subset):
    """The samples of ``dataset`` whose label is in ``classes``, with labels renumbered 0..k-1."""

    def __init__(self, dataset: Dataset, classes: Sequence[int]) -> None:
        labels = targets_of(dataset)
        super().__init__(dataset, np.flatnonzero(np.isin(labels, classes)).tolist())
        self.mapping = {c: i for i, c in enumerate(classes)}
        self.targets = np.array([self.mapping[int(y)] for y in labels[self.indices]], dtype=np.int64)

    def __getitem__(self, index: int):
        image, label = self.dataset[self.indices[index]]
        return image, self.mapping[int(label)]

    def __getitems__(self, indices: list[int]) -> list:
        return [self[i] for i in indices]


def select_classes(splits: DataSplits, classes: Sequence[int], name: str) -> DataSplits:
    known = range(len(splits.classes))
    bad = [c for c in classes if c not in known]
    if bad or len(set(classes)) != len(classes) or len(classes) < 2:
        raise UserError(
            f"dataset.classes={list(classes)} is not a valid class subset of dataset={name}: give at least two "
            f"distinct indices in 0..{len(splits.classes) - 1} ({', '.join(splits.classes[:10])}"
            f"{', ...' if len(splits.classes) > 10 else ''})."
        )
    return DataSplits(
        train=Relabeled(splits.train, classes), val=Relabeled(splits.val, classes),
        test=Relabeled(splits.test, classes), classes=[splits.classes[c] for c in classes],
        channels=splits.channels, size=splits.size, skipped=splits.skipped, notes=splits.notes, text=splits.text,
    )


def few_shot(dataset: Dataset, shots: int, seed: int) -> Subset:
    """``shots`` examples of every class, drawn with ``seed``."""
    labels = targets_of(dataset)
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < shots:
            raise UserError(f"dataset.shots={shots} but class {label} has only {len(members)} train examples.")
        picked += rng.choice(members, size=shots, replace=False).tolist()
    return Subset(dataset, sorted(picked))


def make_task(splits: DataSplits, cfg: DatasetConfig) -> DataSplits:
    """Apply ``dataset.classes``, then ``dataset.fraction`` / ``dataset.shots`` to the train split (drawn with
    ``dataset.shots_seed``, else ``dataset.split_seed``)."""
    draw = cfg.split_seed if cfg.shots_seed is None else cfg.shots_seed
    if cfg.classes is not None:
        splits = select_classes(splits, list(cfg.classes), cfg.name)
    if cfg.fraction is not None or cfg.shots is not None:
        splits.pool = splits.train
    if cfg.fraction is not None:
        if not 0 < cfg.fraction <= 1:
            raise UserError(f"dataset.fraction={cfg.fraction} is not allowed. Allowed: a fraction in (0, 1].")
        if cfg.fraction < 1:
            classes, total = len(set(targets_of(splits.train).tolist())), len(splits.train)
            kept = math.ceil(cfg.fraction * total)  # as scikit-learn rounds it
            if not classes <= kept <= total - classes:  # both sides of a stratified draw hold every class
                low, high = classes / total, (total - classes) / total
                raise UserError(f"dataset.fraction={cfg.fraction} cannot be drawn with every one of the {classes} "
                                f"classes from {total} train samples. Allowed: a fraction from {low:.4g} to "
                                f"{high:.4g}, or 1 (all), or dataset.shots=K per class.")
            _, splits.train = stratified_split(splits.train, cfg.fraction, draw)
    if cfg.shots is not None:
        if cfg.shots < 1:
            raise UserError(f"dataset.shots={cfg.shots} is not allowed. Allowed: an integer >= 1.")
        splits.train = few_shot(splits.train, cfg.shots, draw)
    if splits.pool is not None:
        splits.unlabelled = _left_out(splits.train, splits.pool)
    return splits


def _left_out(drawn: Dataset, pool: Dataset) -> Subset:
    """The samples of ``pool`` that ``drawn`` (a chain of subsets of it) does not hold."""
    rows = np.arange(len(drawn))
    while drawn is not pool:
        rows, drawn = np.asarray(drawn.indices)[rows], drawn.dataset
    return Subset(pool, np.setdiff1d(np.arange(len(pool)), rows).tolist())
