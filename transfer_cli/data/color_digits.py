"""Colour-texture digits, made the way MNIST-M was (Ganin et al. 2016): each grayscale digit is blended over
a random 28x28 patch of a colour photo, out = |background - digit| per channel, so the stroke inverts the
photo under it. The photos are the two that scikit-learn ships (``load_sample_images``: a temple and a
flower), so nothing is downloaded; every other image gets a smooth colour-noise texture instead, which
widens the shift. Written as an image folder (root/train/<class>/*.png, root/test/<class>/*.png) for
``dataset=imagefolder`` / ``target.dataset.name=imagefolder``.

    python -m transfer_cli.data.color_digits OUT [--mnist ../shared/datasets/mnist] [--train 2000] [--test 2000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from transfer_cli.config import DatasetConfig
from transfer_cli.data.splits import DATASETS, tensor_view


def _photos() -> list[torch.Tensor]:
    from sklearn.datasets import load_sample_images

    return [torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in load_sample_images().images]


def _noise_texture(generator: torch.Generator, size: int = 28) -> torch.Tensor:
    """Smooth colour noise: a random 4x4 colour field upsampled, plus fine grain."""
    coarse = torch.rand(1, 3, 4, 4, generator=generator) * 255
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    grain = torch.randn(3, size, size, generator=generator) * 20
    return (smooth + grain).clamp(0, 255)


def blend_digits(digits: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """uint8 digits [N, 1 or none, H, W] -> uint8 colour digits [N, 3, H, W]; even indices over photo patches,
    odd ones over noise textures; reproducible for a given ``seed``."""
    digits = digits.reshape(len(digits), 1, *digits.shape[-2:]).float()
    height, width = digits.shape[-2:]
    generator = torch.Generator().manual_seed(seed)
    photos = _photos()
    out = torch.empty(len(digits), 3, height, width)
    for i, digit in enumerate(digits):
        if i % 2 == 0:
            photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
            top = int(torch.randint(photo.shape[1] - height + 1, (1,), generator=generator))
            left = int(torch.randint(photo.shape[2] - width + 1, (1,), generator=generator))
            background = photo[:, top:top + height, left:left + width].float()
        else:
            background = _noise_texture(generator, height)
        out[i] = (background - digit).abs()
    return out.round().clamp(0, 255).to(torch.uint8)


def write_image_folder(images: torch.Tensor, labels: torch.Tensor, folder: Path) -> None:
    for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        path = folder / str(label) / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def make_color_digits(out: Path, mnist_root: str, train: int = 2000, test: int = 2000, seed: int = 0) -> Path:
    """Colour digits from MNIST: ``train`` images drawn from MNIST's train split, ``test`` from its test split
    (as MNIST-M pairs them), written under ``out``."""
    splits = DATASETS.get("mnist")(DatasetConfig(name="mnist", root=mnist_root))
    generator = np.random.default_rng(seed)
    for name, split, count, offset in (("train", splits.train, train, 0), ("test", splits.test, test, 1)):
        base, rows, labels = tensor_view(split)
        picked = np.sort(generator.choice(len(rows), size=min(count, len(rows)), replace=False))
        images = base.images[rows[picked]]
        write_image_folder(blend_digits(images, seed + offset), labels[picked], out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write MNIST-M-style colour-texture digits as an image folder.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--mnist", default="../shared/datasets/mnist", help="MNIST root (the mnist dataset's files)")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_color_digits(args.out, args.mnist, args.train, args.test, args.seed))


if __name__ == "__main__":
    main()
