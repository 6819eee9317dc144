"""Loader-only throughput on a folder of real photos at 224 px (resize 256, crop 224: the ImageNet recipe):
the per-sample path (PIL decode + resize + crop every epoch, 0 and `auto` workers) against the decoded-once
path (first run: decode + cache; second run: read the cache; batches of the second epoch, with and without
augmentation). Batches are produced exactly as `transfer train` produces them (pipeline.make_loader) and
consumed without a model.

    python bench/data_path.py [--images 1000] [--batch 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from photo_folder import make_photo_folder
from results_table import record

from transfer_cli.config import DatasetConfig
from transfer_cli.data.batches import resolve_workers
from transfer_cli.data.decoded import hold_in_memory
from transfer_cli.data.transforms import InputSpec
from transfer_cli.pipeline import build_data, make_loader

SPEC = InputSpec(channels=3, size=224, mean=[0.5] * 3, std=[0.5] * 3, resize=256)
CPU = torch.device("cpu")


def throughput(loader, epochs: int = 2, limit: int | None = None) -> float:
    """Images per second over the last of ``epochs`` passes (the first warms workers and caches);
    ``limit``: stop after that many images (the per-sample path is slow)."""
    for epoch in range(epochs):
        seen, start = 0, time.perf_counter()
        for images, _ in loader:
            seen += len(images)
            if limit and seen >= limit:
                break
        seconds = time.perf_counter() - start
        if epoch == epochs - 1:
            return seen / seconds
    raise ValueError("epochs must be >= 1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000, help="photos per class (2 classes)")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_photo_folder(Path(tmp) / "photos", {"train": args.images // 2, "val": 4})
        rows = []

        def config(**extra) -> DatasetConfig:
            return DatasetConfig(name="imagefolder", root=str(root), batch_size=args.batch, val_fraction=0.0,
                                 cache_dir=str(Path(tmp) / "cache"), **extra)

        for workers in ("0", "auto"):
            cfg = config(num_workers=workers, in_memory="false")
            start = time.perf_counter()
            splits = build_data(cfg)
            setup = time.perf_counter() - start
            loader = make_loader(splits.train, SPEC, cfg, False, CPU)
            rate = throughput(loader, epochs=2 if workers != "0" else 1, limit=8 * args.batch)
            rows.append({"path": f"per sample, num_workers={workers} ({resolve_workers(workers)})", "augment": "none",
                         "img_per_s": rate, "setup_s": setup})
        base = rows[0]["img_per_s"]

        for run in ("first run (decode + cache)", "second run (cache)"):
            cfg = config()
            start = time.perf_counter()
            splits = hold_in_memory(build_data(cfg), SPEC, cfg, lambda message: None)
            setup = time.perf_counter() - start
            for augment in ("none", "flip_crop"):
                loader = make_loader(splits.train, SPEC, DatasetConfig(**{**cfg.__dict__, "augment": augment}),
                                     True, CPU)
                rows.append({"path": f"decoded once, {run}", "augment": augment, "img_per_s": throughput(loader),
                             "setup_s": setup})
        for row in rows:
            row["vs_per_sample"] = row["img_per_s"] / base
        record("data_path", [{"images": len(splits.train), "batch": args.batch, **row} for row in rows],
               "loader-only throughput, 224 px photos (second epoch)")


if __name__ == "__main__":
    main()
