"""timm backbones: preprocessing from pretrained_cfg, local weight files, and clear refusals."""

from __future__ import annotations

from importlib.util import find_spec

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from transfer_cli.errors import UserError
from transfer_cli.models.backbone import build_backbone

# timm is imported by the tests that run (collection stays light on the worker that runs none of them)
pytestmark = pytest.mark.skipif(find_spec("timm") is None, reason="timm is not installed")


def test_a_local_weights_file_loads_and_brings_the_models_preprocessing(tmp_path):
    import timm

    source = timm.create_model("resnet18.a1_in1k", pretrained=False, num_classes=0)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    bb = build_backbone("timm/resnet18.a1_in1k", str(path), 3)
    assert torch.equal(bb.body.conv1.weight, source.conv1.weight)
    config = timm.data.resolve_model_data_config(source)
    assert bb.weights_meta.crop == config["input_size"][-1]
    assert bb.weights_meta.resize == int(config["input_size"][-1] / config["crop_pct"])
    assert bb.weights_meta.mean == list(config["mean"]) and bb.feature_dim == 512
    assert build_backbone("timm/resnet18", "none", 3).weights_meta is None  # random init: data statistics


def test_vit_takes_its_fixed_input_size_and_features_have_num_features():
    bb = build_backbone("timm/vit_tiny_patch16_224", "none", 3)
    assert bb.fixed_size == 224 and bb.feature_dim == 192
    assert bb.body(torch.zeros(2, 3, 224, 224)).shape == (2, 192)


@pytest.mark.parametrize("name, weights, message", [
    ("timm/resnet_nonsense", "none", "timm has no model 'resnet_nonsense'. Similar names: resnet"),
    ("timm/resnet18", "imagenet", "allowed are none, pretrained"),
])
def test_unknown_models_and_weights_are_refused_by_name(name, weights, message):
    with pytest.raises(UserError, match=message):
        build_backbone(name, weights, 3)


@pytest.mark.slow  # a real timm training run and its eval (timm's own tiny test_resnet, 0.4M parameters)
def test_a_timm_run_trains_and_its_checkpoint_evaluates_the_same(transfer, tmp_path):
    import json

    from conftest import run_folders

    code, _, err = transfer("train", "dataset=digits", "backbone=timm", "backbone.name=timm/test_resnet",
                            "method.freeze=2", "trainer.epochs=3", "trainer.plots=false", "trainer.progress=none",
                            "trainer.threads=1")  # from random weights the number moves with the thread count: pinned
    assert code == 0, err
    run = run_folders(tmp_path)[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["backbone"] == "timm/test_resnet" and summary["test"]["acc1"] > 80
    assert summary["input"]["size"] == 32  # digits are 8 px; timm's resnets take at least 32
    code, _, err = transfer("eval", f"checkpoint={run / 'checkpoints' / 'best.safetensors'}")
    assert code == 0, err
    evaluated = pd.read_csv(sorted((tmp_path / "outputs").rglob("eval.csv"))[0])
    assert evaluated["acc1"].iloc[0] == pytest.approx(summary["test"]["acc1"], abs=1e-6)
