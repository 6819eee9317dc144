"""How images become model input: the spec stored with every checkpoint, and per-sample transforms.

Deterministic, batched work (uint8 -> float, channel adaptation, resizing fixed-size data,
normalisation) happens inside the model (``models.input.InputAdapter``) on whole batches on the
device; only what must happen per sample (decoding, resizing images of varying size, augmentation)
happens here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import Subset
from torchvision.transforms import v2

from transfer_cli.config import DatasetConfig
from transfer_cli.data.splits import DataSplits, TensorImages
from transfer_cli.errors import UserError


@dataclass
class InputSpec:
    channels: int  # what the model's first layer takes
    size: int  # square side the model sees
    mean: list[float]
    std: list[float]
    resize: int | None = None  # per-sample resize before the centre crop (images of varying size)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WeightsMeta:
    """Preprocessing that pretrained weights were trained with (torchvision's ``weights.transforms()``)."""

    crop: int | None  # None: any input size works (a source-pretrained backbone)
    resize: int | None
    mean: list[float]
    std: list[float]


def _train_pixels(splits: DataSplits) -> torch.Tensor | None:
    """The train split's pixels when it is an in-memory tensor (possibly behind nested subsets)."""
    ds, indices = splits.train, None
    while isinstance(ds, Subset):
        picked = torch.as_tensor(ds.indices, dtype=torch.long)
        indices = picked if indices is None else picked[indices]
        ds = ds.dataset
    if not isinstance(ds, TensorImages):
        return None
    return ds.images if indices is None else ds.images[indices]


def _statistics(splits: DataSplits) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the train split when it is in memory; 0.5/0.5 otherwise."""
    pixels = _train_pixels(splits)
    if pixels is None:
        return [0.5] * splits.channels, [0.5] * splits.channels
    x = pixels.float().div_(255).transpose(0, 1).reshape(pixels.shape[1], -1)
    return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()


def _fit_channels(values: list[float], channels: int, key: str) -> list[float]:
    if len(values) == channels:
        return list(values)
    if len(values) == 1:
        return list(values) * channels
    if channels == 1:
        return [sum(values) / len(values)]
    raise UserError(f"{key} has {len(values)} values but the model takes {channels} channels.")


def resolve_input(
    cfg: DatasetConfig,
    splits: DataSplits,
    channels: int,
    min_size: int,
    fixed_size: int | None,
    weights: WeightsMeta | None,
) -> InputSpec:
    """Decide size, channels and normalisation: explicit config, then the weights, then the data."""
    native = splits.size[0] if splits.size else None
    size = cfg.image_size or fixed_size or (weights.crop if weights else None) or native or 224
    if fixed_size and size != fixed_size:
        raise UserError(
            f"dataset.image_size={size} does not fit this backbone, which only takes {fixed_size}x{fixed_size} input."
        )
    size = max(size, min_size)
    if weights:
        mean, std = weights.mean, weights.std
    else:
        mean, std = _statistics(splits)
    mean = _fit_channels(list(cfg.mean) if cfg.mean is not None else mean, channels, "dataset.mean")
    std = _fit_channels(list(cfg.std) if cfg.std is not None else std, channels, "dataset.std")
    resize = None
    if splits.size is None:  # varying sizes: resize then centre-crop, keeping the weights' ratio
        resize = round(size * weights.resize / weights.crop) if weights and weights.crop else size
    return InputSpec(channels=channels, size=size, mean=mean, std=std, resize=resize)


def sample_transform(spec: InputSpec, data_size: tuple[int, int] | None, augment: str, train: bool) -> Callable | None:
    """Per-sample work: decode and bring varying sizes to one size; augment the train split."""
    augment = augment if train else "none"
    steps: list[Callable] = []
    if data_size is None:
        steps.append(v2.PILToTensor())
        if augment == "flip_crop":
            steps += [v2.RandomResizedCrop(spec.size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            steps += [v2.Resize(spec.resize or spec.size, antialias=True), v2.CenterCrop(spec.size)]
    elif augment == "flip_crop":
        steps += [v2.RandomCrop(data_size, padding=max(1, data_size[0] // 8)), v2.RandomHorizontalFlip()]
    if augment == "randaugment":
        steps.append(v2.RandAugment())
    elif augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    return v2.Compose(steps) if steps else None
