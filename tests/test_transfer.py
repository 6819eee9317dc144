"""Source -> target transfer, ensembles of checkpoints, and the real pretrained CIFAR ResNets."""

import json

import pandas as pd
import pytest
import torch
from conftest import invoke, shared_path

from transfer_cli.errors import UserError
from transfer_cli.models.backbone import BACKBONES
from transfer_cli.models.cifar_resnet import CifarResNet
from transfer_cli.models.weights import read_state_dict
from transfer_cli.train import run_train
from transfer_cli.validation import validate


def test_source_model_is_pretrained_once_and_reused(compose_cfg, tmp_path, quiet_console):
    overrides = ["experiment=digits_transfer", f"output_dir={tmp_path}", "trainer.epochs=3", "source.epochs=2",
                 "trainer.plots=false"]
    first = run_train(compose_cfg(*overrides), tmp_path / "a", quiet_console)
    caches = list((tmp_path / "cache" / "source").glob("*/model.safetensors"))
    assert len(caches) == 1 and first["weights"] == str(caches[0])
    metrics = pd.read_csv(tmp_path / "a" / "metrics.csv")
    assert metrics["split"].tolist()[:2] == ["source_val", "source_val"]
    assert metrics[metrics.split == "source_val"]["acc1"].iloc[-1] > 80  # digits 0-4 are easy
    mtime = caches[0].stat().st_mtime_ns
    second = run_train(compose_cfg(*overrides, "method=linear_probe", "seed=1"), tmp_path / "b", quiet_console)
    assert caches[0].stat().st_mtime_ns == mtime and "source model from cache" in quiet_console.file.getvalue()
    assert second["weights"] == first["weights"]
    other = run_train(compose_cfg(*overrides, "source.epochs=3"), tmp_path / "c", quiet_console)
    assert other["weights"] != first["weights"]  # another source config, another cached model


def test_source_weights_without_a_source_block_fail_before_any_work(compose_cfg):
    with pytest.raises(UserError, match="backbone.weights=source needs a source task"):
        validate(compose_cfg("backbone.weights=source"))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    paths = []
    for name, backbone in (("a", "small_cnn"), ("b", "lenet")):
        result = invoke("train", f"backbone={backbone}", "trainer.epochs=2", "trainer.progress=none",
                         f"hydra.run.dir={root / name}", cwd=root)
        assert result.returncode == 0, result.stderr
        paths.append(root / name / "checkpoints" / "best.safetensors")
    return root, paths


@pytest.mark.parametrize("fusion", ["mean", "vote", "weighted"])
def test_ensemble_table_has_every_member_and_the_fused_row(two_checkpoints, tmp_path, fusion):
    root, (a, b) = two_checkpoints
    extra = ["ensemble.weights=[0.7,0.3]"] if fusion == "weighted" else []
    result = invoke("eval", f"checkpoint=[{a},{b}]", f"ensemble={fusion}", *extra, f"hydra.run.dir={tmp_path}",
                     cwd=root)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "eval.csv")
    assert table["model"].tolist() == [str(a), str(b), f"ensemble ({fusion})"]
    assert table["backbone"].tolist() == ["small_cnn", "lenet", "small_cnn+lenet"]
    assert {"acc1", "acc5", "loss", "macro_f1", "n"} <= set(table.columns) and (table["n"] == 360).all()
    members = [json.loads((root / n / "summary.json").read_text())["test"]["acc1"] for n in ("a", "b")]
    assert table["acc1"].iloc[:2].tolist() == pytest.approx(members)
    assert table["acc1"].iloc[2] >= min(members) - 5


def test_weighted_ensemble_without_weights_exits_2(two_checkpoints, tmp_path):
    root, (a, b) = two_checkpoints
    result = invoke("eval", f"checkpoint=[{a},{b}]", "ensemble=weighted", cwd=tmp_path)
    assert result.returncode == 2 and "ensemble=weighted needs ensemble.weights" in result.stderr


@pytest.mark.parametrize("depth, params", [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)])
def test_cifar_resnets_load_the_published_weights_exactly(depth, params):
    path = next(shared_path("weights", "cifar10_resnets").glob(f"resnet{depth}-*.th"))
    model = CifarResNet(depth)
    model.load_state_dict(read_state_dict(str(path)), strict=True)
    assert sum(p.numel() for p in model.parameters()) == params
    bb = BACKBONES.get(f"cifar_resnet{depth}")(weights=str(path))
    assert bb.feature_dim == 64 and len(bb.stages) == 4 and bb.weights_meta.crop == 32
    x = torch.randn(2, 3, 32, 32)
    assert bb.body(x).shape == (2, 64)
