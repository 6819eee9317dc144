"""How images become model input: the spec stored with every checkpoint, and the per-sample transform.

Deterministic, batched work (uint8 -> float, channel adaptation, resizing fixed-size data,
normalisation) happens inside the model (``models.input.InputAdapter``) on whole batches on the
device. Data held in memory is cut and augmented per batch (``data.augment``); only image files
that are decoded per sample (more than ``dataset.in_memory`` holds) go through ``sample_transform``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from torchvision.transforms import InterpolationMode, v2

from transfer_cli.config import DatasetConfig
from transfer_cli.data.augment import POLICIES
from transfer_cli.data.splits import DataSplits, tensor_view
from transfer_cli.errors import UserError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass
class InputSpec:
    channels: int  # what the model's first layer takes
    size: int  # square side the model sees
    mean: list[float]
    std: list[float]
    resize: int | None = None  # per-sample resize before the centre crop (images of varying size)
    interpolation: str = "bilinear"  # of that resize: the filter the weights were trained with

    def filter(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    def to_dict(self) -> dict:
        return asdict(self)

    def brief(self) -> dict:
        return self.to_dict()

    def describe(self) -> str:
        return f"input {self.channels}x{self.size}x{self.size}"


@dataclass
class WeightsMeta:
    """Preprocessing that pretrained weights were trained with (torchvision's ``weights.transforms()``)."""

    crop: int | None  # None: any input size works (a source-pretrained backbone)
    resize: int | None
    mean: list[float] | None  # None: computed on the train split
    std: list[float] | None
    interpolation: str | None = None  # None: bilinear

    def updated(self, values: dict) -> WeightsMeta:
        """These values with the keys set (not None) in ``values`` (resize, crop, interpolation, mean, std) replaced."""
        kinds = {"mean": list, "std": list, "interpolation": str}
        given = {k: kinds.get(k, int)(v) for k, v in values.items() if v is not None}
        return replace(self, **given)


def _statistics(splits: DataSplits) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the train split when it is in memory; 0.5/0.5 otherwise."""
    view = tensor_view(splits.train)
    if view is None:
        return [0.5] * splits.channels, [0.5] * splits.channels
    base, rows, _ = view
    pixels = base.images[rows]
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
    if weights is not None and weights.mean is not None and weights.std is not None:
        mean, std = weights.mean, weights.std
    else:
        mean, std = _statistics(splits)
        if weights is not None:
            mean, std = weights.mean or mean, weights.std or std
    mean = _fit_channels(list(cfg.mean) if cfg.mean is not None else mean, channels, "dataset.mean")
    std = _fit_channels(list(cfg.std) if cfg.std is not None else std, channels, "dataset.std")
    resize = None
    if splits.size is None:  # varying sizes: resize then centre-crop, keeping the weights' ratio
        if weights and weights.crop and weights.resize:
            resize = round(size * weights.resize / weights.crop)
        else:
            resize = (weights.resize if weights else None) or size
    interpolation = (weights.interpolation if weights else None) or "bilinear"
    return InputSpec(channels=channels, size=size, mean=mean, std=std, resize=resize, interpolation=interpolation)


def sample_transform(spec: InputSpec, augment: str) -> Callable:
    """Per-sample work for images of varying size held as files: decode, bring to one size, augment."""
    steps: list[Callable] = [v2.PILToTensor()]
    if augment == "flip_crop":
        steps += [v2.RandomResizedCrop(spec.size, interpolation=spec.filter(), antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps += [v2.Resize(spec.resize or spec.size, interpolation=spec.filter(), antialias=True), v2.CenterCrop(spec.size)]
    if augment in POLICIES:
        steps.append(POLICIES[augment]())
    return v2.Compose(steps)
