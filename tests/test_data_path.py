"""The decode-once data path: cache keyed by the files, pixels equal to the per-sample path, per-image
batched augmentation with torchvision's distributions, and whole runs equal to the per-sample path."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms as v1

from transfer_cli.config import DatasetConfig
from transfer_cli.data import decoded
from transfer_cli.data.augment import RRC_RATIO, RRC_SCALE, BatchAugment, resized_crop_boxes
from transfer_cli.data.batches import resolve_workers, usable_cores
from transfer_cli.data.decoded import DecodedImages, hold_in_memory
from transfer_cli.data.identity import data_identity
from transfer_cli.data.transforms import InputSpec, sample_transform
from transfer_cli.pipeline import build_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from photo_folder import make_photo_folder  # noqa: E402

SPEC = InputSpec(channels=3, size=40, mean=[0.5] * 3, std=[0.5] * 3, resize=46)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    # a test/ folder too: without one a test split is carved from train/, and train is no longer whole
    return make_photo_folder(tmp_path_factory.mktemp("photos"), {"train": 12, "val": 4, "test": 2}, sides=(41, 90))


def _held(root: Path, cache: Path, messages: list[str] | None = None, spec: InputSpec = SPEC, **cfg):
    data_cfg = DatasetConfig(name="imagefolder", root=str(root), cache_dir=str(cache), **cfg)
    splits = build_data(data_cfg)
    return splits, hold_in_memory(splits, spec, data_cfg, (messages if messages is not None else []).append)


def _images(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_decoded_centre_crops_equal_the_per_sample_transform(photos, tmp_path, interpolation):
    spec = dataclasses.replace(SPEC, interpolation=interpolation)
    splits, held = _held(photos, tmp_path, spec=spec)
    per_sample = sample_transform(spec, "none")
    augment = BatchAugment("none", spec.size, decoded=True)
    for name in ("train", "val"):
        expected = torch.stack([per_sample(image) for image, _ in splits.split(name)])
        assert torch.equal(augment(_images(held.split(name))), expected)
    assert data_identity(held) == data_identity(splits)  # a decoded copy is the same data
    if interpolation != "bilinear":  # another filter is another cached copy, with other pixels
        _, bilinear = _held(photos, tmp_path)
        assert not torch.equal(bilinear.train.images, held.train.images)


def test_the_cache_is_reused_and_a_changed_file_is_decoded_again(photos, tmp_path):
    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    first: list[str] = []
    _, held = _held(root, tmp_path / "cache", first)
    assert "decoded once" in first[0]
    again: list[str] = []
    _, held_again = _held(root, tmp_path / "cache", again)
    assert "read from the cache" in again[0]
    assert torch.equal(held_again.train.images, held.train.images)

    changed = sorted((root / "train" / "flower").iterdir())[0]
    Image.new("RGB", (60, 50), (255, 0, 0)).save(changed)
    after: list[str] = []
    splits, held_after = _held(root, tmp_path / "cache", after)
    assert "decoded once" in after[0]
    base = held_after.train
    assert isinstance(base, DecodedImages)
    index = [str(path) for path, _ in base.source.samples].index(str(changed))
    assert torch.all(base.images[index, 0] >= 250) and torch.all(base.images[index, 1:] <= 5)  # red (JPEG)
    others = [i for i in range(len(base)) if i != index]
    assert torch.equal(base.images[others], held.train.images[others])


def test_over_the_budget_auto_decodes_per_sample_and_says_so(photos, tmp_path, monkeypatch):
    monkeypatch.setattr(decoded, "IN_MEMORY_BUDGET", 1000)
    messages: list[str] = []
    splits, held = _held(photos, tmp_path, messages)
    assert held is splits and "over the" in messages[0] and "dataset.in_memory=true" in messages[0]
    _, forced = _held(photos, tmp_path, in_memory="true")
    assert isinstance(forced.train, DecodedImages)
    _, off = _held(photos, tmp_path, in_memory="false")
    assert not isinstance(off.train, DecodedImages)


def test_resized_crop_boxes_follow_torchvision_distribution():
    torch.manual_seed(0)
    n, height, width = 4000, 64, 96
    ours = resized_crop_boxes(n, height, width).float()
    image = torch.zeros(3, height, width)
    theirs = torch.tensor([v1.RandomResizedCrop.get_params(image, list(RRC_SCALE), list(RRC_RATIO))
                           for _ in range(n)]).float()
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = {k: b[:, 2] * b[:, 3] / (height * width) for k, b in (("ours", ours), ("theirs", theirs))}
    assert area["ours"].min() >= RRC_SCALE[0] - 0.02 and area["ours"].max() <= 1.0
    for q in (0.1, 0.5, 0.9):
        assert abs(area["ours"].quantile(q) - area["theirs"].quantile(q)) < 0.03
    log_ratio = {k: (b[:, 3] / b[:, 2]).log() for k, b in (("ours", ours), ("theirs", theirs))}
    assert abs(log_ratio["ours"].mean() - log_ratio["theirs"].mean()) < 0.02
    assert log_ratio["ours"].abs().max() <= math.log(4 / 3) + 0.1  # + rounding of small crops
    # offsets spread over every feasible position: the mean relative position is about one half
    slack = (height - ours[:, 2]).clamp_min(1)
    assert abs((ours[:, 0] / slack).mean() - 0.5) < 0.03


def test_batched_flip_crop_flips_half_and_crops_each_image_on_its_own():
    torch.manual_seed(0)
    n = 2000
    # each image is a horizontal ramp, so a flip reverses the order of its columns
    ramp = torch.arange(32, dtype=torch.uint8).expand(n, 3, 32, 32).contiguous()
    out = BatchAugment("flip_crop", 32, decoded=False)(ramp)
    assert out.shape == ramp.shape
    # padded crop: columns stay consecutive (with zero padding at one edge), reversed when flipped
    centre = out[:, 0, 16, 8:24].float()
    steps = centre[:, 1:] - centre[:, :-1]
    flipped = (steps == -1).all(1)
    assert ((steps == 1).all(1) | flipped).all()
    assert abs(flipped.float().mean().item() - 0.5) < 0.04
    shifts = (out[:, 0, 16, 16].float() - 16)
    shifts = torch.where(flipped, -shifts - 1, shifts)  # where column 16 came from, relative to the centre
    assert shifts.abs().max() <= 4 and len(shifts.unique()) == 9  # padding 32 // 8 = 4: every offset -4..4
    decoded_out = BatchAugment("flip_crop", 24, decoded=True)(ramp[:64])
    assert decoded_out.shape == (64, 3, 24, 24) and decoded_out.dtype == torch.uint8
    assert len({tuple(img[0, 0].tolist()) for img in decoded_out}) > 32  # different crops per image


def test_a_run_on_the_decoded_path_equals_the_per_sample_path(photos, tmp_path, compose_cfg, quiet_console):
    from transfer_cli.train import run_train

    tables, children = [], set(multiprocessing.active_children())
    for mode in ("true", "false"):
        cfg = compose_cfg("dataset=imagefolder", f"dataset.root={photos}", "dataset.image_size=32",
                          "dataset.augment=none", f"dataset.in_memory={mode}", f"output_dir={tmp_path}",
                          "trainer.epochs=3", "trainer.plots=false", "dataset.batch_size=8", "dataset.num_workers=1")
        summary = run_train(cfg, tmp_path / mode, quiet_console)
        # the per-sample path's worker processes (persistent across epochs) end with the run, not at some later gc
        assert set(multiprocessing.active_children()) == children
        tables.append(pd.read_csv(tmp_path / mode / "metrics.csv"))
    assert summary["test"]["acc1"] > 50
    columns = ["epoch", "split", "loss", "acc1"]
    pd.testing.assert_frame_equal(tables[0][columns], tables[1][columns])
    assert np.isfinite(tables[0]["loss"]).all()


def test_num_workers_auto_leaves_one_core_for_training():
    assert resolve_workers("auto") == max(0, usable_cores() - 1)
    assert resolve_workers("3") == 3


def test_files_that_decoded_are_not_checked_again_until_they_change(photos, tmp_path, monkeypatch):
    from transfer_cli.data import imagefolder

    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    checked: list[Path] = []
    real_check = imagefolder.check_image
    monkeypatch.setattr(imagefolder, "check_image", lambda path: checked.append(path) or real_check(path))
    cfg = DatasetConfig(name="imagefolder", root=str(root), cache_dir=str(tmp_path / "cache"))
    first = build_data(cfg)
    assert len(checked) == len(first.train) + len(first.val) + len(first.test)
    checked.clear()
    assert len(build_data(cfg).train) == len(first.train) and checked == []
    broken = sorted((root / "val" / "china").iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:200])  # truncated: size and mtime change
    again = build_data(cfg)
    assert checked == [broken] and again.skipped == 1 and len(again.val) == len(first.val) - 1


def test_a_corrupt_decoded_cache_or_check_record_is_rebuilt_not_trusted(photos, tmp_path):
    _, held = _held(photos, tmp_path / "cache")
    for stored in (tmp_path / "cache").iterdir():
        stored.write_bytes(b"garbage")  # a disk error or a killed copy
    messages: list[str] = []
    splits, again = _held(photos, tmp_path / "cache", messages)
    assert "decoded once" in messages[0] and len(again.train) == len(splits.train)
    assert torch.equal(again.train.images, held.train.images)
