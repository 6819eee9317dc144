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

from transfer_cli.data.splits import DataSplits, TensorImages


def _rows(dataset: Dataset) -> tuple[Dataset, np.ndarray]:
    """The base dataset under ``dataset``'s subset chain and the base row of each of its samples."""
    rows = None
    while isinstance(dataset, Subset):
        picked = np.asarray(dataset.indices, dtype=np.int64)
        rows = picked if rows is None else picked[rows]
        dataset = dataset.dataset
    return dataset, (np.arange(len(dataset)) if rows is None else rows)


class _Contents:
    """A digest of the content of each base sample, computed once per sample."""

    def __init__(self) -> None:
        self.known: dict[tuple[int, int], bytes] = {}

    def of(self, base: Dataset, row: int) -> bytes | None:
        key = (id(base), row)
        if key not in self.known:
            self.known[key] = _content(base, row)
        return self.known[key]


def _content(base: Dataset, row: int) -> bytes | None:
    if isinstance(base, TensorImages):
        return hashlib.sha256(base.images[row].contiguous().numpy().tobytes()).digest()
    if hasattr(base, "texts"):
        return hashlib.sha256(base.texts[row].encode("utf-8", "surrogatepass")).digest()
    if hasattr(base, "samples"):  # image files
        return hashlib.sha256(Path(base.samples[row][0]).read_bytes()).digest()
    return None  # a dataset whose samples are not files, texts or tensors: not compared


def shared_with_train(splits: DataSplits) -> dict[str, list[int]]:
    """For val and test: the positions of their samples whose content equals a train sample's."""
    contents = _Contents()
    base, rows = _rows(splits.train)
    train = {contents.of(base, int(r)) for r in rows} - {None}
    shared = {}
    for name in ("val", "test"):
        base, rows = _rows(splits.split(name))
        shared[name] = [i for i, r in enumerate(rows) if (c := contents.of(base, int(r))) is not None and c in train]
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
