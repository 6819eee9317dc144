"""How an image file becomes RGB pixels: one decoding for training, evaluation and prediction.

``Image.convert("RGB")`` alone gets three common kinds of file wrong without a word: a camera photo whose
EXIF orientation says "rotated" is read sideways, a 16-bit PNG is clipped at 255 (almost white), and an
RGBA image whose drawing lives in the alpha channel (black pixels, opaque where drawn) becomes all black.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit greyscale as Pillow opens it
BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as browsers and viewers show them


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` upright (EXIF orientation applied), scaled to 8 bits and composited on BACKGROUND."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_GREY:
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba)
    return image.convert("RGB")


def open_rgb(path: Path | str) -> Image.Image:
    with Image.open(path) as image:
        return to_rgb(image)
