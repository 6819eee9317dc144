"""A folder of real photos of varying size, made offline from scikit-learn's two bundled sample photos
(china.jpg, flower.jpg; 427x640): each file is a random crop of one of them, rescaled to a random size
and saved as JPEG, in root/<split>/<photo>/. Used by the data-path benchmark and tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images


def make_photo_folder(root: Path, per_class: dict[str, int], sides: tuple[int, int] = (240, 400),
                      seed: int = 0) -> Path:
    """``per_class``: split -> images per class. Sides (short side) are drawn from ``sides``."""
    rng = np.random.default_rng(seed)
    photos = load_sample_images()
    names = [Path(f).stem for f in photos.filenames]
    for split, count in per_class.items():
        for name, photo in zip(names, photos.images, strict=True):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            height, width = photo.shape[:2]
            for i in range(count):
                crop_h = int(rng.integers(height // 2, height + 1))
                crop_w = int(rng.integers(width // 2, width + 1))
                top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
                image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
                short = int(rng.integers(*sides))
                scale = short / min(crop_h, crop_w)
                image = image.resize((max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.BILINEAR)
                image.save(folder / f"{i:05d}.jpg", quality=90)
    return root
