"""Samples that a held-out split shares with the train split, byte for byte.

A test sample that is also a train sample measures memory, not transfer: 100 random-label texts repeated
three times score 100 % "test" accuracy. Such duplicates are counted in the run's notes (header and
``data_notes`` of the summary); ``dataset.drop_duplicates=true`` removes them from val and test.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from transfer_cli.data.splits import DataSplits, InMemory


def _rows(dataset: Dataset) -> tuple[Dataset, np.ndarray]:
    """The base dataset under ``dataset``'s subset chain and the base row of each of its samples."""
    rows = None
    while isinstance(dataset, Subset):
        picked = np.asarray(dataset.indices, dtype=np.int64)
        rows = picked if rows is None else picked[rows]
        dataset = dataset.dataset
    return dataset, (np.arange(len(dataset)) if rows is None else rows)


def _quick(base: Dataset, row: int) -> bytes | int | None:
    """A cheap key that equal samples share: a file's size (files are read only when sizes collide, so an
    image folder is not read twice over), else the content digest itself."""
    if hasattr(base, "samples") and not hasattr(base, "texts"):
        return Path(base.samples[row][0]).stat().st_size
    return _content(base, row)


def _content(base: Dataset, row: int) -> bytes | None:
    if isinstance(base, InMemory):
        return hashlib.sha256(base.tensor[row].contiguous().numpy().tobytes()).digest()
    if hasattr(base, "texts"):
        return hashlib.sha256(base.texts[row].encode("utf-8", "surrogatepass")).digest()
    if hasattr(base, "samples"):  # image files
        return hashlib.sha256(Path(base.samples[row][0]).read_bytes()).digest()
    return None  # a dataset whose samples are not files, texts or tensors: not compared


def shared_with_train(splits: DataSplits) -> dict[str, list[int]]:
    """For val and test: the positions of their samples whose content equals a train sample's."""
    sides = {name: _rows(splits.split(name)) for name in ("train", "val", "test")}
    quick = {name: [_quick(base, int(r)) for r in rows] for name, (base, rows) in sides.items()}
    held = set(quick["val"]) | set(quick["test"])
    train_quick = set(quick["train"]) - {None}
    base, rows = sides["train"]
    train = {_content(base, int(r)) for r, q in zip(rows, quick["train"], strict=True) if q in held} - {None}
    shared = {}
    for name in ("val", "test"):
        base, rows = sides[name]
        shared[name] = [i for i, (r, q) in enumerate(zip(rows, quick[name], strict=True))
                        if q in train_quick and _content(base, int(r)) in train]
    return shared


def flag_duplicates(splits: DataSplits, drop: bool) -> DataSplits:
    """``splits`` with a note when val or test share samples with train; with ``drop``, without them."""
    shared = shared_with_train(splits)
    if not any(shared.values()):
        return splits
    counts = ", ".join(f"{len(v)} of {len(splits.split(k))} {k}" for k, v in shared.items() if v)
    if not drop:
        splits.notes.append(f"duplicates: {counts} samples equal a train sample byte for byte, so they measure "
                            "memory, not transfer. dataset.drop_duplicates=true removes them from val and test.")
        return splits
    for name, positions in shared.items():
        if positions:
            gone = set(positions)
            dataset = splits.split(name)
            setattr(splits, name, Subset(dataset, [i for i in range(len(dataset)) if i not in gone]))
    splits.notes.append(f"duplicates: {counts} samples equal a train sample and were removed "
                        "(dataset.drop_duplicates=true).")
    return splits
