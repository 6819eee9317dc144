"""Augmentation of whole uint8 batches on the training device, for data held in memory.

torchvision's v2 transforms accept a batch but draw one set of random parameters for all of it; a batch
in which every image has the same crop and flip is not what training expects. Here the random
parameters are drawn per image, vectorised, with torchvision's own rules (``RandomResizedCrop``'s ten
tries and fallback, ``RandomCrop`` with zero padding, a fair coin for the flip); the pixel work uses
torchvision's functional ops per image, so each augmented image equals what the per-sample transform
would have produced with the same parameters. Randomness comes from torch's global generator, which a
resumed run restores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

# ``affine``: the geometric jitter that suits digits and other centred shapes, where flips and crops change
# the class. Batches held in memory draw the same parameters per image, vectorised (see ``affine_batch``).
AFFINE = {"degrees": 15.0, "translate": (0.1, 0.1), "scale": (0.8, 1.2)}
# Per-image policies of the per-sample path; in-memory batches apply the same ones image by image.
POLICIES = {
    "randaugment": v2.RandAugment,
    "trivialaugment": v2.TrivialAugmentWide,
    "affine": lambda: v2.RandomAffine(**AFFINE),
}

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
_TRIES = 10


def centre_anchor(length: int, crop: int) -> int:
    """Where torchvision's ``CenterCrop`` starts a crop of ``crop`` pixels in ``length`` (same rounding)."""
    return int(round((length - crop) / 2.0))


def resized_crop_boxes(n: int, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """``n`` boxes (top, left, h, w) drawn as ``RandomResizedCrop`` draws them: area fraction from
    RRC_SCALE, log-uniform aspect ratio from RRC_RATIO, the first of ten tries that fits, else the
    largest centred crop within the ratio range."""
    area = height * width
    scale = torch.empty(n, _TRIES, device=device).uniform_(*RRC_SCALE) * area
    log_ratio = torch.empty(n, _TRIES, device=device).uniform_(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    ratio = log_ratio.exp()
    w = (scale * ratio).sqrt().round()
    h = (scale / ratio).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(1, keepdim=True)  # index of the first fitting try (0 when none fits)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    any_fit = fits.any(1)
    # Fallback, as torchvision: the whole image clamped to the ratio range, centred.
    in_ratio = width / height
    fw, fh = (width, height) if RRC_RATIO[0] <= in_ratio <= RRC_RATIO[1] else (
        (width, round(width / RRC_RATIO[0])) if in_ratio < RRC_RATIO[0] else (round(height * RRC_RATIO[1]), height))
    w = torch.where(any_fit, w, torch.full_like(w, fw))
    h = torch.where(any_fit, h, torch.full_like(h, fh))
    top = (torch.rand(n, device=device) * (height - h + 1)).floor()
    left = (torch.rand(n, device=device) * (width - w + 1)).floor()
    top = torch.where(any_fit, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(any_fit, left, torch.full_like(left, (width - fw) // 2))
    return torch.stack([top, left, h, w], 1).long()


class BatchAugment:
    """uint8 batch [N, C, H, W] -> the batch the model sees, augmented per image when ``augment`` says so.

    ``decoded``: the batch holds photos decoded once at the resize size (square, aligned so that a centred
    crop equals the per-sample Resize + CenterCrop); they are cropped to ``size`` here. Otherwise the
    batch holds fixed-size data at its own size and the model resizes it."""

    def __init__(self, augment: str, size: int, decoded: bool) -> None:
        self.augment, self.size, self.decoded = augment, size, decoded
        self.policy = POLICIES[augment]() if augment in POLICIES and augment != "affine" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.augment == "flip_crop":
            x = self._resized_crops(x) if self.decoded else self._padded_crops(x)
            return self._flip(x)
        if self.decoded and x.shape[-1] != self.size:
            top, left = centre_anchor(x.shape[-2], self.size), centre_anchor(x.shape[-1], self.size)
            x = x[..., top:top + self.size, left:left + self.size]
        if self.augment == "affine":
            return affine_batch(x)
        if self.policy is not None:  # one policy draw per image
            x = torch.stack([self.policy(image) for image in x])
        return x

    def _resized_crops(self, x: torch.Tensor) -> torch.Tensor:
        boxes = resized_crop_boxes(len(x), x.shape[-2], x.shape[-1], x.device).tolist()
        return torch.stack([TF.resized_crop(image, t, left, h, w, [self.size, self.size], antialias=True)
                            for image, (t, left, h, w) in zip(x, boxes, strict=True)])

    def _padded_crops(self, x: torch.Tensor) -> torch.Tensor:
        """RandomCrop(own size, padding=side // 8) per image: zero padding, one offset pair per image."""
        n, _, height, width = x.shape
        pad = max(1, height // 8)
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
        rows = (dy + torch.arange(height, device=x.device))[:, None, :, None]
        cols = (dx + torch.arange(width, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return padded[batch, channel, rows, cols]

    @staticmethod
    def _flip(x: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(len(x), device=x.device) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)


def affine_batch(x: torch.Tensor) -> torch.Tensor:
    """``RandomAffine(**AFFINE)`` drawn per image (uniform angle, translation in pixels, scale), applied to the
    whole uint8 batch in one ``grid_sample`` with nearest-neighbour sampling and zero fill, as torchvision's
    default. Per-image loops of small tensors are slow once several processes share the cores."""
    n, _, height, width = x.shape
    angle = torch.empty(n, device=x.device).uniform_(-AFFINE["degrees"], AFFINE["degrees"]) * math.pi / 180
    shift = torch.stack([torch.empty(n, device=x.device).uniform_(-t, t) for t in AFFINE["translate"]], 1)
    scale = torch.empty(n, device=x.device).uniform_(*AFFINE["scale"])
    # The grid maps output to input coordinates in [-1, 1]: the inverse of rotate-scale-translate.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    offset = 2 * shift  # a fraction of the side -> grid units ([-1, 1] spans it)
    theta = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)
    theta = torch.cat([theta, -(theta @ offset[:, :, None])], 2)
    grid = F.affine_grid(theta, [n, x.shape[1], height, width], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).to(x.dtype)


def strong_colour_batch(x: torch.Tensor, channels: int = 3, cutout: float = 0.5) -> torch.Tensor:
    """A strong photometric view of a uint8 batch, drawn per image (FixMatch's "strong" augmentation, turned
    to the colour and polarity shifts that separate digit domains): a random channel order, inversion with
    probability 1/2, a random gain and offset per channel, grayscale with probability 1/5, then one cutout
    square of ``cutout`` x the side filled with mid-gray. A 1-channel batch is first repeated to
    ``channels``, so a grayscale source can be coloured for an RGB model."""
    n, c, height, width = x.shape
    if c == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    x = x.float() / 255
    if x.shape[1] == 3:
        order = torch.rand(n, 3, device=x.device).argsort(1)
        x = x.gather(1, order[:, :, None, None].expand_as(x))
    invert = torch.rand(n, 1, 1, 1, device=x.device) < 0.5
    x = torch.where(invert, 1 - x, x)
    gain = torch.empty(n, x.shape[1], 1, 1, device=x.device).uniform_(0.5, 1.5)
    offset = torch.empty(n, x.shape[1], 1, 1, device=x.device).uniform_(-0.25, 0.25)
    mean = x.mean((2, 3), keepdim=True)
    x = ((x - mean) * gain + mean + offset).clamp(0, 1)  # contrast and brightness per channel
    if x.shape[1] == 3:
        gray = torch.rand(n, 1, 1, 1, device=x.device) < 0.2
        x = torch.where(gray, x.mean(1, keepdim=True).expand_as(x), x)
    side = max(1, round(cutout * min(height, width)))
    top = torch.randint(0, height - side + 1, (n, 1, 1, 1), device=x.device)
    left = torch.randint(0, width - side + 1, (n, 1, 1, 1), device=x.device)
    rows = torch.arange(height, device=x.device)[None, None, :, None]
    cols = torch.arange(width, device=x.device)[None, None, None, :]
    hole = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    x = torch.where(hole, torch.full_like(x, 0.5), x)
    return (x * 255).round().to(torch.uint8)
