"""A folder of images per class: root/train/<class>/*, root/val/<class>/* and optionally root/test/."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from transfer_cli.config import DatasetConfig
from transfer_cli.data.splits import DATASETS, DataSplits, stratified_split
from transfer_cli.errors import UserError


def _is_image(path: Path) -> bool:
    try:
        with Image.open(path) as img:  # reads the header only
            img.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


class ImageFiles(Dataset):
    """(RGB PIL image, label) pairs from class sub-folders, with a class list fixed by the caller."""

    def __init__(self, folder: Path, classes: list[str]) -> None:
        self.samples: list[tuple[Path, int]] = []
        self.skipped = 0
        for label, name in enumerate(classes):
            class_dir = folder / name
            if not class_dir.is_dir():
                continue
            for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
                if _is_image(path):
                    self.samples.append((path, label))
                else:
                    self.skipped += 1
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            return img.convert("RGB"), label


@DATASETS.register("imagefolder")
def imagefolder(cfg: DatasetConfig) -> DataSplits:
    if not cfg.root:
        raise UserError("dataset=imagefolder needs dataset.root=PATH, a folder holding train/<class>/ images.")
    root = Path(cfg.root).expanduser()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UserError(
            f"dataset.root={str(root)!r} has no train/ folder. dataset=imagefolder expects "
            "root/train/<class>/<image> and root/val/<class>/<image> (root/test/ is optional)."
        )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{train_dir} holds no class folders (expected train/<class>/<image>).")
    train = ImageFiles(train_dir, classes)
    if len(train) == 0:
        raise UserError(f"no readable images under {train_dir} ({train.skipped} other files skipped).")
    parts = {split: ImageFiles(root / split, classes) for split in ("val", "test") if (root / split).is_dir()}
    skipped = train.skipped + sum(p.skipped for p in parts.values())
    val = parts.get("val")
    if val is None or len(val) == 0:
        train, val = stratified_split(train, cfg.val_fraction, cfg.split_seed)
    # Without a test/ folder the held-out val/ folder is the only unseen data: report on it.
    test = parts.get("test") or val
    return DataSplits(train, val, test, classes, channels=3, size=None, skipped=skipped)
