"""scikit-learn's bundled 8x8 digits: real data that needs no network, the embedded default."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from transfer_cli.config import DatasetConfig
from transfer_cli.data.splits import DATASETS, DataSplits, TensorImages, stratified_split


@DATASETS.register("digits")
def digits(cfg: DatasetConfig) -> DataSplits:
    bunch = load_digits()
    # Pixel values are 0..16; scale to the 0..255 range every other dataset uses.
    images = torch.from_numpy(bunch.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    full = TensorImages(images, bunch.target)
    rest, test = stratified_split(full, cfg.test_fraction, cfg.split_seed)
    train, val = stratified_split(rest, cfg.val_fraction / (1 - cfg.test_fraction), cfg.split_seed)
    return DataSplits(train, val, test, [str(c) for c in bunch.target_names], channels=1, size=(8, 8))
