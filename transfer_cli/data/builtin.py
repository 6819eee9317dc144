"""torchvision's built-in datasets by name, plus readers for the raw files MNIST and USPS ship as."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torchvision.datasets as tvd

from transfer_cli.config import DatasetConfig
from transfer_cli.data.splits import DATASETS, DataSplits, TensorImages, stratified_split, targets_of
from transfer_cli.errors import UserError


@dataclass(frozen=True)
class Builtin:
    cls: str  # class name in torchvision.datasets
    channels: int
    size: int | None  # fixed side length; None for photo collections of varying size
    split_kwargs: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"train": {"train": True}, "test": {"train": False}}
    )


def _split_arg(train: str, test: str, val: str | None = None) -> dict[str, dict[str, Any]]:
    out = {"train": {"split": train}, "test": {"split": test}}
    if val:
        out["val"] = {"split": val}
    return out


BUILTINS: dict[str, Builtin] = {
    "mnist": Builtin("MNIST", 1, 28),
    "fashion_mnist": Builtin("FashionMNIST", 1, 28),
    "kmnist": Builtin("KMNIST", 1, 28),
    "cifar10": Builtin("CIFAR10", 3, 32),
    "cifar100": Builtin("CIFAR100", 3, 32),
    "svhn": Builtin("SVHN", 3, 32, _split_arg("train", "test")),
    "stl10": Builtin("STL10", 3, 96, _split_arg("train", "test")),
    "usps": Builtin("USPS", 1, 16),
    "flowers102": Builtin("Flowers102", 3, None, _split_arg("train", "test", "val")),
    "oxford_iiit_pet": Builtin("OxfordIIITPet", 3, None, _split_arg("trainval", "test")),
    "dtd": Builtin("DTD", 3, None, _split_arg("train", "test", "val")),
    "food101": Builtin("Food101", 3, None, _split_arg("train", "test")),
}

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ESL_USPS_FILES = {"train": "zip.train.gz", "test": "zip.test.gz"}


def _root(cfg: DatasetConfig) -> Path:
    if not cfg.root:  # the dataset's YAML sets root: data; only an explicit dataset.root=null gets here
        raise UserError(f"dataset={cfg.name} needs dataset.root=PATH: the folder that holds (or will hold) its files.")
    return Path(cfg.root).expanduser()


def _open_maybe_gz(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the format MNIST is published in), gzip-compressed or not."""
    with _open_maybe_gz(path) as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
        raise UserError(f"{path} is not an unsigned-byte IDX file (magic number {magic:#x}).")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_split(root: Path, split: str) -> TensorImages | None:
    images, labels = (_find(root, stem) for stem in IDX_FILES[split])
    if images is None or labels is None:
        return None
    return TensorImages(torch.from_numpy(read_idx(images).copy()).unsqueeze(1), read_idx(labels).astype(np.int64))


def _esl_usps_split(root: Path, split: str) -> TensorImages | None:
    """USPS as the Elements of Statistical Learning ships it: label, then 256 values in [-1, 1]."""
    path = root / ESL_USPS_FILES[split]
    if not path.is_file():
        return None
    with gzip.open(path) as f:
        table = np.loadtxt(f)
    pixels = np.clip(np.round((table[:, 1:] + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return TensorImages(torch.from_numpy(pixels).reshape(-1, 1, 16, 16), table[:, 0].astype(np.int64))


def _as_tensor_images(ds: Any) -> TensorImages:
    """Fixed-size torchvision datasets keep their pixels in ``.data``; hold them as one tensor."""
    data = np.asarray(ds.data)
    if data.ndim == 3:
        data = data[:, None]
    elif data.shape[-1] in (1, 3) and data.shape[1] not in (1, 3):
        data = data.transpose(0, 3, 1, 2)
    return TensorImages(torch.from_numpy(np.ascontiguousarray(data)), targets_of(ds))


def _torchvision_split(name: str, spec: Builtin, cfg: DatasetConfig, split: str) -> Any:
    root = _root(cfg)
    cls = getattr(tvd, spec.cls)
    try:
        return cls(root=str(root), download=cfg.download, **spec.split_kwargs[split])
    except (RuntimeError, FileNotFoundError, OSError) as err:
        if cfg.download:
            raise UserError(
                f"dataset={name}: downloading into dataset.root={str(root)!r} failed ({err}). "
                "Check the network connection, or download the files yourself and point dataset.root at them."
            ) from None
        raise UserError(
            f"dataset={name}: no {spec.cls} data found under dataset.root={str(root)!r} ({err}). "
            f"Set dataset.download=true to fetch it into that folder, or set dataset.root to the folder "
            f"that holds it."
        ) from None


def _classes(ds: Any) -> list[str]:
    names = getattr(ds, "classes", None)
    if names:
        return [str(c) for c in names]
    return [str(i) for i in range(int(targets_of(ds).max()) + 1)]


def _raw_reader(name: str):
    if name in ("mnist", "fashion_mnist", "kmnist"):
        return _idx_split
    if name == "usps":
        return _esl_usps_split
    return None


def build_builtin(name: str, cfg: DatasetConfig) -> DataSplits:
    spec = BUILTINS[name]
    root = _root(cfg)
    reader = _raw_reader(name)
    train = reader(root, "train") if reader else None
    if train is not None:  # the raw files sit directly in dataset.root
        test = reader(root, "test")
        if test is None:
            raise UserError(f"dataset={name}: found the train files in dataset.root={str(root)!r} but not the test files.")
        val = None
        classes = [str(c) for c in getattr(getattr(tvd, spec.cls), "classes", range(10))]
    else:
        raw = {split: _torchvision_split(name, spec, cfg, split) for split in spec.split_kwargs}
        classes = _classes(raw["train"])
        convert = _as_tensor_images if spec.size else (lambda ds: ds)
        train, test = convert(raw["train"]), convert(raw["test"])
        val = convert(raw["val"]) if "val" in raw else None
    if val is None:
        train, val = stratified_split(train, cfg.val_fraction, cfg.split_seed)
    size = (spec.size, spec.size) if spec.size else None
    return DataSplits(train, val, test, classes, channels=spec.channels, size=size)


def _register(name: str) -> None:
    DATASETS.add(name, lambda cfg: build_builtin(name, cfg))


for _name in BUILTINS:
    _register(_name)
