"""A folder of images per class: root/train/<class>/*, root/val/<class>/* and optionally root/test/."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from transfer_cli.config import DatasetConfig
from transfer_cli.data.images import open_rgb
from transfer_cli.data.splits import DATASETS, DataSplits, stratified_split
from transfer_cli.errors import UserError
from transfer_cli.files import atomic_write_text

_DRAFT = (64, 64)  # JPEGs are checked at a reduced DCT scale: every byte is still read, far fewer pixels made


def check_image(path: Path) -> str | None:
    """None when ``path`` decodes completely as an image; otherwise why not. A header check alone passes
    truncated JPEGs, which would then kill training mid-epoch; a decompression bomb is refused by name."""
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", _DRAFT)
            img.load()
        return None
    except Image.DecompressionBombError as err:
        raise UserError(f"{path} is refused as a decompression bomb ({err}). Remove it from the dataset folder, "
                        "or shrink it, if it is a real image.") from None
    except Exception as err:  # noqa: BLE001 - any file PIL cannot fully decode is not a usable image
        return f"{type(err).__name__}: {err}"


def _fact(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:  # a broken link or a vanished file: check_image says why
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _problem(path: Path, refuse_bombs: bool) -> str | None:
    """``check_image``; with ``refuse_bombs`` false a decompression bomb is one more unusable file (predict)."""
    try:
        return check_image(path)
    except UserError as err:
        if refuse_bombs:
            raise
        return str(err)


def check_images(paths: list[Path], record: Path | None, refuse_bombs: bool = True) -> list[str | None]:
    """``check_image`` of every path, in threads. ``record`` (a JSON file) remembers the size and mtime of
    the files that decoded: those are not decoded again while both stay the same."""
    try:
        known = json.loads(record.read_text()) if record is not None and record.is_file() else {}
    except (OSError, ValueError):  # an unreadable record only means every file is checked again
        known = {}
    known = known if isinstance(known, dict) else {}
    facts = [_fact(path) for path in paths]
    todo = [i for i, (path, fact) in enumerate(zip(paths, facts, strict=True)) if fact is None or known.get(str(path)) != fact]
    problems: list[str | None] = [None] * len(paths)
    with ThreadPoolExecutor(max_workers=8) as pool:
        checked = pool.map(lambda path: _problem(path, refuse_bombs), [paths[i] for i in todo])
        for i, problem in zip(todo, checked, strict=True):
            problems[i] = problem
    if record is not None and todo:
        good = {str(path): fact for path, fact, problem in zip(paths, facts, problems, strict=True) if problem is None}
        atomic_write_text(record, json.dumps(good))
    return problems


class ImageFiles(Dataset):
    """(RGB PIL image, label) pairs from class sub-folders, with a class list fixed by the caller.
    Every file is fully decoded once while indexing (in threads; files already checked with the same size
    and mtime are remembered under ``check_dir``); files that fail are skipped and named."""

    def __init__(self, folder: Path, classes: list[str], check_dir: Path | None = None) -> None:
        candidates = [(path, label) for label, name in enumerate(classes) if (folder / name).is_dir()
                      for path in sorted(p for p in (folder / name).rglob("*") if p.is_file())]
        record = None
        if check_dir is not None:
            record = check_dir / f"checked-{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]}.json"
        problems = check_images([path for path, _ in candidates], record)
        self.samples = [pair for pair, problem in zip(candidates, problems, strict=True) if problem is None]
        self.bad = [(path, problem) for (path, _), problem in zip(candidates, problems, strict=True) if problem]
        self.targets = [label for _, label in self.samples]

    def relabel(self, kept: list[int]) -> None:
        """Keep the samples of the labels in ``kept``, renumbered 0..len(kept)-1 in that order."""
        new = {old: i for i, old in enumerate(kept)}
        self.samples = [(path, new[label]) for path, label in self.samples if label in new]
        self.targets = [label for _, label in self.samples]

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return open_rgb(path), label


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


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
    found = _class_folders(train_dir)
    check_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None
    train = ImageFiles(train_dir, found, check_dir)
    present = set(train.targets)
    classes = [name for i, name in enumerate(found) if i in present]
    notes = []
    empty = [name for name in found if name not in classes]
    if empty:  # an empty folder would become a class the model can never be right about
        notes.append(f"ignored {len(empty)} class folder(s) of {train_dir} without readable images: {', '.join(empty)}")
        train.relabel([found.index(name) for name in classes])
    if len(classes) < 2:
        raise UserError(f"dataset.root={str(root)!r}: {train_dir} has {len(classes)} class folder(s) with readable "
                        f"images ({', '.join(classes) or 'none'}); classification needs at least two.")
    parts = {split: ImageFiles(root / split, classes, check_dir) for split in ("val", "test") if (root / split).is_dir()}
    for split in parts:
        extra = [name for name in _class_folders(root / split) if name not in classes]
        if extra:
            notes.append(f"{root / split} has class folder(s) that train/ lacks, ignored: {', '.join(extra)}")
    bad = train.bad + [b for part in parts.values() for b in part.bad]
    if bad:
        shown = "; ".join(f"{path} ({problem})" for path, problem in bad[:3])
        notes.append(f"skipped {len(bad)} file(s) that do not decode as images, e.g. {shown}")
    # Without a test/ folder a test split is carved from train/, so the test score never comes from the
    # images that chose the best epoch (val/); fractions are of train/ as found, as for digits.
    test, carved = parts.get("test"), 0.0
    if test is None or len(test) == 0:
        train, test = _carve(train, cfg.test_fraction, cfg.split_seed, "test_fraction", root)
        carved = cfg.test_fraction
        notes.append(f"{root} has no test/ folder: a stratified {cfg.test_fraction:.0%} of train/ "
                     f"(dataset.test_fraction, dataset.split_seed={cfg.split_seed}) is held out as the test split.")
    val = parts.get("val")
    if val is None or len(val) == 0:
        train, val = _carve(train, cfg.val_fraction / (1 - carved), cfg.split_seed, "val_fraction", root)
    return DataSplits(train, val, test, classes, channels=3, size=None, skipped=len(bad), notes=notes)


def _carve(dataset: Dataset, fraction: float, seed: int, key: str, root: Path) -> tuple[Dataset, Dataset]:
    """A stratified ``fraction`` of ``dataset`` held out; a clear error when it cannot hold every class."""
    try:
        return stratified_split(dataset, fraction, seed)
    except ValueError as err:
        raise UserError(f"dataset.{key}={fraction:.4g} of the {len(dataset)} images under {root}/train cannot hold every "
                        f"class ({err}). Add images, a {'test' if key == 'test_fraction' else 'val'}/ folder, or "
                        f"change dataset.{key}.") from None
