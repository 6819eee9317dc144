"""Unlabelled images to predict on: which files an ``input=`` names, and their pixels as the model takes them."""

from __future__ import annotations

import csv
import glob
import io
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from transfer_cli.data.augment import centre_anchor
from transfer_cli.data.decoded import decode
from transfer_cli.data.imagefolder import check_images
from transfer_cli.data.images import open_rgb
from transfer_cli.data.transforms import InputSpec
from transfer_cli.errors import UserError

LISTS = (".txt", ".csv", ".tsv")  # files that list image paths instead of being one


def find_inputs(value: str) -> list[Path]:
    """The files ``input=`` names: one file, every file below a folder (symlinked folders followed once), a
    glob (``**`` recursive), or a .txt (one path per line) / .csv / .tsv (a ``path`` column, else the first)
    list, relative paths taken from the list's folder. Non-image files and broken links stay in the list:
    prediction reports why each one failed. A file reached twice (through links) is listed once."""
    path = Path(value).expanduser()
    if path.is_dir():
        found = _walk(path)
    elif path.is_file() and path.suffix.lower() in LISTS:
        found = _listed(path)
    elif path.is_file():
        found = [path]
    else:
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file() or Path(p).is_symlink())
    found = _unique(found)
    if not found:
        raise UserError(f"input={value!r} matches no file. Give an image file, a folder (searched recursively), "
                        "a glob such as 'photos/**/*.jpg' (quoted), or a .txt/.csv file listing image paths.")
    return found


def _walk(folder: Path) -> list[Path]:
    """Every non-hidden file below ``folder``; each real folder is entered once, so a link loop ends."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(top) / f for f in files if not f.startswith(".")]
    return sorted(found)


def _unique(paths: list[Path]) -> list[Path]:
    """``paths`` without a second path to a file already listed (broken links are kept, each once)."""
    kept, seen = [], set()
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            kept.append(path)
    return kept


def _listed(path: Path) -> list[Path]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"input={str(path)!r} is a list of image paths that is not UTF-8 text ({err}): save it "
                        "as UTF-8, one path per line (or a path column).") from None
    if path.suffix.lower() == ".txt":
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
        if not rows:
            return []
        column = rows[0].index("path") if "path" in rows[0] else 0
        header = "path" in rows[0] or not (path.parent / rows[0][column]).expanduser().exists()
        names = [row[column] for row in rows[1 if header else 0:] if len(row) > column and row[column].strip()]
    return [p if p.is_absolute() else path.parent / p for p in (Path(n).expanduser() for n in names)]


class _Files(Dataset):
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return open_rgb(self.paths[index]), 0


def model_input(batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """A dataset batch (uint8 [N, C, H, W]) in the form exported models take: 3-channel uint8 squares of
    ``spec.size`` (grey repeated to RGB; other sizes resized as the model would resize them)."""
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    if batch.shape[-2:] != (spec.size, spec.size):
        resized = F.interpolate(batch.float(), size=(spec.size, spec.size), mode="bilinear", antialias=True,
                                align_corners=False)
        batch = resized.round().clamp(0, 255).to(torch.uint8)
    return batch.contiguous()


def decoded_chunks(paths: list[Path], spec: InputSpec, chunk: int = 512) -> Iterator[tuple[list[int], torch.Tensor,
                                                                                        dict[int, str]]]:
    """Per chunk of ``paths``: the indices that decoded, their pixels (uint8 [n, 3, size, size]: resized and
    centre-cropped exactly as the checkpoint's evaluation data was), and why the others did not decode."""
    side = spec.resize or spec.size
    for start in range(0, len(paths), chunk):
        part = paths[start:start + chunk]
        problems = check_images(part, None, refuse_bombs=False)  # one bad file is one row, not the end
        good = [start + i for i, problem in enumerate(problems) if problem is None]
        failed = {start + i: problem for i, problem in enumerate(problems) if problem is not None}
        if not good:
            yield [], torch.empty(0, 3, spec.size, spec.size, dtype=torch.uint8), failed
            continue
        images = decode(_Files([paths[i] for i in good]), side, spec.size, spec.interpolation)
        top = left = centre_anchor(side, spec.size)
        yield good, images[..., top:top + spec.size, left:left + spec.size].contiguous(), failed
