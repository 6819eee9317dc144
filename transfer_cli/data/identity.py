"""A digest of exactly what a dataset holds, for cache keys that must change whenever the data does.

Files count by path, size and modification time (cheap, and any edit or replacement changes them);
in-memory tensors by their bytes. The resolved sample list (after class subsets, few-shot draws and
split carving) enters through the indices, so a different selection gives a different key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from transfer_cli.data.splits import DataSplits, InMemory


def _file_fact(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def base_digest(dataset: Dataset, memo: dict[int, str] | None = None) -> str:
    """The digest of one dataset that is not a subset of another."""
    memo = {} if memo is None else memo
    source = getattr(dataset, "source", None)  # a decoded copy is the data it was decoded from
    if source is not None:
        return base_digest(source, memo)
    key = id(dataset)
    if key in memo:
        return memo[key]
    digest = hashlib.sha256(type(dataset).__name__.encode())
    if isinstance(dataset, InMemory):
        digest.update(dataset.tensor.contiguous().numpy().tobytes())
        digest.update(dataset.targets.numpy().tobytes())
    elif hasattr(dataset, "texts"):  # TextSamples
        for text in dataset.texts:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
        digest.update(np.asarray(dataset.targets, dtype=np.int64).tobytes())
    elif hasattr(dataset, "samples"):  # (path, label) pairs: our ImageFiles and torchvision's ImageFolder
        for path, label in dataset.samples:
            digest.update(f"{_file_fact(Path(path))}:{label}\n".encode())
    else:  # other torchvision datasets: every file under their root
        root = Path(getattr(dataset, "root", "."))
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(f"{_file_fact(path)}\n".encode())
        digest.update(str(len(dataset)).encode())
    memo[key] = digest.hexdigest()
    return memo[key]


def _dataset_digest(dataset: Dataset, memo: dict[int, str], labels: bool = True) -> str:
    chain: list[Any] = []
    while isinstance(dataset, Subset):  # Relabeled is a Subset too; its mapping follows from the indices
        chain.append(np.asarray(dataset.indices, dtype=np.int64).tobytes())
        if labels and hasattr(dataset, "mapping"):
            chain.append(repr(sorted(dataset.mapping.items())).encode())
        dataset = dataset.dataset
    digest = hashlib.sha256(base_digest(dataset, memo).encode())
    for part in chain:
        digest.update(part)
    return digest.hexdigest()


def data_identity(splits: DataSplits) -> str:
    """One hex digest of every split's samples and the class names."""
    memo: dict[int, str] = {}
    digest = hashlib.sha256(repr(splits.classes).encode())
    for name in ("train", "val", "test"):
        digest.update(f"{name}:{_dataset_digest(splits.split(name), memo)}".encode())
    return digest.hexdigest()[:32]


def split_identities(splits: DataSplits, labels: bool = True) -> dict[str, str]:
    """A digest per split of exactly its samples: what a split's cached features depend on (besides the
    weights and the preprocessing), unchanged when another split's draw changes. ``labels=False``: which
    samples a split holds, whatever the class numbering (a checkpoint records this of its held-out splits)."""
    memo: dict[int, str] = {}
    return {name: _dataset_digest(splits.split(name), memo, labels)[:32] for name in ("train", "val", "test")}


def sample_positions(dataset: Dataset) -> tuple[str, np.ndarray]:
    """(the digest of the dataset under every subset of ``dataset``, the positions of its samples there): two
    splits hold a sample in common exactly when the digests match and the positions intersect."""
    positions = None
    while isinstance(dataset, Subset):
        indices = np.asarray(dataset.indices, dtype=np.int64)
        positions = indices if positions is None else indices[positions]
        dataset = dataset.dataset
    return base_digest(dataset), np.arange(len(dataset)) if positions is None else positions


def input_identities(splits: DataSplits, spec: Any) -> dict[str, dict[str, Any]]:
    """Per split, what identifies the model input it gives: its samples' digest and the preprocessing
    (``spec``, an InputSpec or TextSpec); the key of a split's cached features."""
    return {split: {"input": spec.to_dict(), "samples": digest} for split, digest in split_identities(splits).items()}
