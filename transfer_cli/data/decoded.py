"""Decode once: photo datasets held in memory as one uint8 tensor at the model's resize size.

Per-sample decoding (PIL open, decode, resize, crop) runs at a few hundred images per second on a CPU,
every epoch; a GPU trains at thousands. Datasets of images of varying size whose decoded copy fits
``IN_MEMORY_BUDGET`` (or any size with ``dataset.in_memory=true``) are decoded once, in threads, and the
copy is cached on disk under ``dataset.cache_dir``, keyed by the files (path, size, mtime, label), the
resize spec and this module's format; a changed file gives a new key, so a stale copy is never read.

Each image is stored as a square of ``spec.resize`` pixels (``spec.size`` when the spec has no resize: a
target domain of files next to a fixed-size source): resized to that short side exactly as the
per-sample path resizes it, then cut so that a centred crop of ``spec.size`` from the square is the very
crop the per-sample ``CenterCrop`` takes. Evaluation therefore sees identical pixels on both paths; random
resized crops for training are drawn from the square (the per-sample path draws them from the whole,
uncropped image).
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from transfer_cli.config import DatasetConfig
from transfer_cli.data.augment import centre_anchor
from transfer_cli.data.batches import usable_cores
from transfer_cli.data.identity import base_digest
from transfer_cli.data.splits import DataSplits, InMemory, TensorImages, base_of, targets_of, with_base
from transfer_cli.data.transforms import InputSpec
from transfer_cli.files import atomic_write

IN_MEMORY_BUDGET = 4 * 2**30  # bytes of decoded pixels that dataset.in_memory=auto holds in memory
FORMAT = 1  # bump when the stored pixels change for the same files and spec


class DecodedImages(TensorImages):
    """A dataset of files decoded once; ``source`` is the dataset it was decoded from (and its identity)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, source: Dataset) -> None:
        super().__init__(images, labels)
        self.source = source


def decode(dataset: Dataset, resize: int, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Every image of ``dataset`` (PIL images) as uint8 [N, 3, resize, resize], aligned for the centre crop."""
    mode = InterpolationMode(interpolation)
    out = torch.empty(len(dataset), 3, resize, resize, dtype=torch.uint8)

    def one(index: int) -> None:
        image, _ = dataset[index]
        pixels = TF.resize(TF.pil_to_tensor(image.convert("RGB")), [resize], interpolation=mode, antialias=True)
        height, width = pixels.shape[-2:]
        top = min(centre_anchor(height, size) - centre_anchor(resize, size), height - resize)
        left = min(centre_anchor(width, size) - centre_anchor(resize, size), width - resize)
        out[index] = pixels[:, top:top + resize, left:left + resize]

    with ThreadPoolExecutor(max_workers=2 * usable_cores()) as pool:  # PIL and torch release the GIL
        list(pool.map(one, range(len(dataset))))
    return out


def _side(spec: InputSpec) -> int:
    """The stored square's side: the per-sample path's resize (the crop size when it has none)."""
    return spec.resize or spec.size


def cache_path(dataset: Dataset, spec: InputSpec, cache_dir: Path) -> Path:
    key = hashlib.sha256(f"{FORMAT}:{base_digest(dataset)}:{_side(spec)}:{spec.size}:{spec.interpolation}".encode()).hexdigest()[:24]
    return cache_dir / f"{key}.safetensors"


def decoded_copy(dataset: Dataset, spec: InputSpec, cache_dir: Path | None) -> tuple[DecodedImages, bool]:
    """The decoded copy of ``dataset`` and whether it came from the cache (None: no cache)."""
    labels = torch.as_tensor(targets_of(dataset), dtype=torch.long)
    side = _side(spec)
    if cache_dir is None:
        return DecodedImages(decode(dataset, side, spec.size, spec.interpolation), labels, dataset), False
    path = cache_path(dataset, spec, cache_dir)
    if path.is_file():
        try:
            images = load_file(str(path))["images"]
        except Exception:  # noqa: BLE001 - an unreadable cache file is decoded again, never trusted
            images = None
        if images is not None and images.shape == (len(dataset), 3, side, side):
            return DecodedImages(images, labels, dataset), True
    images = decode(dataset, side, spec.size, spec.interpolation)
    atomic_write(path, lambda tmp: save_file({"images": images}, str(tmp)))
    return DecodedImages(images, labels, dataset), False


def hold_in_memory(splits: DataSplits, spec: InputSpec, cfg: DatasetConfig, log: Callable[[str], None]) -> DataSplits:
    """``splits`` with its image files replaced by their decoded copies when ``dataset.in_memory`` says so."""
    mode = str(cfg.in_memory).lower()
    bases = {id(b): b for b in map(base_of, (splits.train, splits.val, splits.test)) if not isinstance(b, InMemory)}
    if splits.size is not None or mode == "false" or not bases:
        return splits
    side = _side(spec)
    need = sum(len(b) for b in bases.values()) * 3 * side ** 2
    if mode == "auto" and need > IN_MEMORY_BUDGET:
        log(f"dataset={cfg.name}: decoded at {side} px the images would take {need / 2**30:.1f} GiB, over "
            f"the {IN_MEMORY_BUDGET / 2**30:.0f} GiB that dataset.in_memory=auto holds; decoding per sample "
            "instead (dataset.in_memory=true holds them anyway).")
        return splits
    start = time.perf_counter()
    copies, cached = {}, []
    for key, base in bases.items():
        copies[key], hit = decoded_copy(base, spec, Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None)
        cached.append(hit)
    count = sum(len(b) for b in bases.values())
    how = "read from the cache" if all(cached) else "decoded once"
    log(f"{count:,} images {how} at {side}x{side} ({need / 2**30:.2f} GiB in memory, "
        f"{time.perf_counter() - start:.1f} s; cache: {cfg.cache_dir})")
    swapped = copy.copy(splits)
    for name in ("train", "val", "test", *(("unlabelled",) if splits.unlabelled is not None else ())):
        setattr(swapped, name, with_base(splits.split(name), lambda base: copies.get(id(base), base)))
    return swapped
