"""Datasets on real data: digits (bundled), MNIST and USPS (../shared), an image folder."""

import math

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image

from transfer_cli.config import DatasetConfig
from transfer_cli.data.splits import targets_of
from transfer_cli.data.transforms import InputSpec, WeightsMeta, resolve_input, sample_transform
from transfer_cli.errors import UserError
from transfer_cli.models.input import InputAdapter
from transfer_cli.pipeline import build_data


def test_digits_splits_are_disjoint_stratified_and_seeded():
    splits = build_data(DatasetConfig(name="digits"))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1257, 180, 360)
    assert splits.classes == [str(i) for i in range(10)] and splits.size == (8, 8)
    ids = [set(s.indices) for s in (splits.train, splits.val)]
    assert not ids[0] & ids[1]
    assert np.bincount(targets_of(splits.val)).min() >= 17  # every class present, about 18 each
    again = build_data(DatasetConfig(name="digits"))
    assert again.val.indices == splits.val.indices
    other = build_data(DatasetConfig(name="digits", split_seed=1))
    assert other.val.indices != splits.val.indices
    image, label = splits.train[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 8, 8) and image.max() > 200


def test_mnist_reads_the_four_idx_files():
    root = shared_path("datasets", "mnist")
    splits = build_data(DatasetConfig(name="mnist", root=str(root), val_fraction=0.1))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    test_counts = np.bincount(targets_of(splits.test))
    assert test_counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    image, _ = splits.test[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8


def test_usps_reads_the_esl_files():
    root = shared_path("datasets", "usps")
    splits = build_data(DatasetConfig(name="usps", root=str(root), val_fraction=0.0))
    assert len(splits.train) == 7291 and len(splits.test) == 2007
    assert np.bincount(targets_of(splits.test)).tolist() == [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]
    image, _ = splits.test[0]
    assert image.shape == (1, 16, 16) and image.min() == 0 and image.max() == 255


def test_missing_torchvision_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(UserError, match=rf"dataset=cifar10: no CIFAR10 data found under dataset.root='{tmp_path}'"
                                         r".*Set dataset.download=true"):
        build_data(DatasetConfig(name="cifar10", root=str(tmp_path)))


def _image_folder(root, split, per_class):
    for name, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40 + i, 30), colour).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_imagefolder_skips_and_counts_files_that_are_not_images(tmp_path):
    _image_folder(tmp_path, "train", 6)
    _image_folder(tmp_path, "val", 2)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")
    splits = build_data(DatasetConfig(name="imagefolder", root=str(tmp_path), cache_dir=str(tmp_path / "cache")))
    assert splits.classes == ["cat", "dog"] and splits.skipped == 2
    # no test/ folder: 20 % of train/ is carved as the test split (never the val/ images that choose the epoch)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 4, 3)
    assert not {p for p, _ in (splits.test.dataset.samples[i] for i in splits.test.indices)} & {
        p for p, _ in splits.val.samples}
    assert any("no test/ folder" in note for note in splits.notes)
    spec = resolve_input(DatasetConfig(image_size=24), splits, 3, 8, None, None)
    transform = sample_transform(spec, "none")
    image, label = splits.val[0]
    out = transform(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8 and label == 0


def test_imagefolder_without_train_folder_explains_the_layout(tmp_path):
    with pytest.raises(UserError, match="has no train/ folder. dataset=imagefolder expects root/train/<class>"):
        build_data(DatasetConfig(name="imagefolder", root=str(tmp_path), cache_dir=str(tmp_path / "cache")))


def test_input_spec_prefers_config_then_weights_then_data():
    splits = build_data(DatasetConfig(name="digits"))
    from_data = resolve_input(DatasetConfig(), splits, channels=3, min_size=32, fixed_size=None, weights=None)
    assert from_data.size == 32 and len(from_data.mean) == 3 and 0.1 < from_data.mean[0] < 0.5
    meta = WeightsMeta(crop=224, resize=256, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    from_weights = resolve_input(DatasetConfig(), splits, 3, 32, None, meta)
    assert from_weights.size == 224 and from_weights.mean == meta.mean
    explicit = resolve_input(DatasetConfig(image_size=64, mean=[0.5], std=[0.5]), splits, 3, 32, None, meta)
    assert explicit.size == 64 and explicit.mean == [0.5, 0.5, 0.5]
    with pytest.raises(UserError, match="only takes 224x224"):
        resolve_input(DatasetConfig(image_size=64), splits, 3, 32, 224, meta)


def test_input_adapter_turns_gray_uint8_into_normalised_rgb():
    spec = InputSpec(channels=3, size=16, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    x = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out = InputAdapter(spec)(x)
    assert out.shape == (2, 3, 16, 16) and torch.allclose(out, torch.ones_like(out))
    rgb_to_gray = InputAdapter(InputSpec(channels=1, size=8, mean=[0.0], std=[1.0]))
    assert torch.allclose(rgb_to_gray(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)), torch.ones(1, 1, 8, 8))


def test_imagefolder_of_real_digit_pngs_trains(tmp_path, compose_cfg, quiet_console):
    from sklearn.datasets import load_digits

    from transfer_cli.train import run_train

    bunch = load_digits()
    for i, (pixels, label) in enumerate(zip(bunch.images[:600], bunch.target[:600], strict=True)):
        split = "val" if i % 5 == 0 else "train"
        folder = tmp_path / "digits" / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255 / 16).astype(np.uint8)).convert("RGB").save(folder / f"{i}.png")
    (tmp_path / "digits" / "train" / "README.txt").write_text("class folders only")
    cfg = compose_cfg("dataset=imagefolder", f"dataset.root={tmp_path / 'digits'}", "dataset.image_size=16",
                      "dataset.augment=none", "trainer.epochs=8", "trainer.plots=false")
    summary = run_train(cfg, tmp_path / "run", quiet_console)
    assert summary["test"]["acc1"] > 85
    assert "digit9" in (tmp_path / "run" / "checkpoints" / "best.json").read_text()


def test_class_subset_is_relabelled_in_every_split_and_shots_apply_to_train_only():
    splits = build_data(DatasetConfig(name="digits", classes=[7, 3], shots=4))
    assert splits.classes == ["7", "3"]
    assert np.bincount(targets_of(splits.train)).tolist() == [4, 4]
    test_labels = targets_of(splits.test)
    full = build_data(DatasetConfig(name="digits"))
    full_counts = np.bincount(targets_of(full.test))
    assert np.bincount(test_labels).tolist() == [full_counts[7], full_counts[3]]
    images = [img for img, label in (splits.test[i] for i in range(len(splits.test))) if label == 0]
    sevens = [img for img, label in (full.test[i] for i in range(len(full.test))) if label == 7]
    assert all(torch.equal(a, b) for a, b in zip(images, sevens, strict=True))


def test_fraction_keeps_a_stratified_part_of_train():
    splits = build_data(DatasetConfig(name="digits", fraction=0.25))
    assert len(splits.train) == math.ceil(0.25 * 1257) and np.bincount(targets_of(splits.train)).min() >= 30
    smallest = build_data(DatasetConfig(name="digits", fraction=10 / 1257))  # the edge the error names
    assert len(smallest.train) == 10 and np.bincount(targets_of(smallest.train)).tolist() == [1] * 10


@pytest.mark.parametrize("cfg, message", [
    (DatasetConfig(name="digits", classes=[3, 12]), r"dataset.classes=\[3, 12\] is not a valid class subset of dataset=digits"),
    (DatasetConfig(name="digits", shots=500), r"dataset.shots=500 but class 0 has only \d+ train examples"),
    (DatasetConfig(name="digits", fraction=1.5), r"dataset.fraction=1.5 is not allowed"),
    # 1257 train samples, 10 classes: a stratified draw must leave at least one of each on both sides
    (DatasetConfig(name="digits", fraction=0.005), r"dataset.fraction=0.005 cannot be drawn .* from 0.007955 to 0.992"),
    (DatasetConfig(name="digits", fraction=0.9999), r"dataset.fraction=0.9999 cannot be drawn"),
])
def test_bad_task_settings_are_clear_errors(cfg, message):
    with pytest.raises(UserError, match=message):
        build_data(cfg)


def test_weights_bring_their_preprocessing_a_sidecar_and_backbone_preprocess_override_it(tmp_path):
    import json

    import torchvision
    from safetensors.torch import save_file

    from transfer_cli.config import HeadConfig
    from transfer_cli.pipeline import build_image_model

    _image_folder(tmp_path / "data", "train", 4)
    data_cfg = DatasetConfig(name="imagefolder", root=str(tmp_path / "data"), val_fraction=0.5,
                             cache_dir=str(tmp_path / "cache"))
    splits = build_data(data_cfg)
    weights = tmp_path / "resnet18_in1k.safetensors"
    save_file(torchvision.models.resnet18().state_dict(), str(weights))

    def spec(**preprocess):
        return build_image_model(data_cfg, splits, "resnet18", str(weights), HeadConfig(), preprocess=preprocess).spec

    plain = spec()  # torchvision's resnet18 recipe: resize 256, crop 224, ImageNet statistics
    assert (plain.size, plain.resize, plain.mean, plain.interpolation) == (224, 256, [0.485, 0.456, 0.406], "bilinear")
    weights.with_suffix(".json").write_text(json.dumps({"resize": 232, "mean": [0.5, 0.5, 0.5],
                                                        "interpolation": "bicubic"}))
    sidecar = spec()
    assert (sidecar.size, sidecar.resize, sidecar.mean, sidecar.std) == (224, 232, [0.5] * 3, plain.std)
    assert sidecar.interpolation == "bicubic"
    chosen = spec(resize=240, crop=200, std=[0.2, 0.2, 0.2], interpolation="nearest")
    assert (chosen.size, chosen.resize, chosen.mean, chosen.std) == (200, 240, [0.5] * 3, [0.2] * 3)
    assert chosen.interpolation == "nearest"
    weights.with_suffix(".json").write_text(json.dumps({"interpolation": "lanczos5"}))
    with pytest.raises(UserError, match="states interpolation='lanczos5'. Allowed: bilinear, bicubic, nearest"):
        spec()
