"""`transfer rank` through the entry point: real pretrained weights rank above their random-init copy, a failing
candidate is a row with its error, bad input is refused before any work."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import shared_path
from omegaconf import OmegaConf

from transfer_cli.config import BackboneConfig
from transfer_cli.rank import _bootstrap_draws, shifted_interval, train_overrides


def rank_table(tmp_path) -> pd.DataFrame:
    (table,) = (tmp_path / "outputs" / "ranks").glob("*/rank.csv")
    return pd.read_csv(table)


@pytest.mark.slow  # real data from ../shared; the edit loop's runs use the bundled digits
def test_mnist_lenet_ranks_above_its_random_init_copy_on_usps_and_a_broken_candidate_is_a_row(transfer, tmp_path):
    usps = shared_path("datasets", "usps")
    lenet = shared_path("weights", "mnist_lenet5", "lenet5_mnist.pth")
    code, out, err = transfer("rank", "dataset=usps", f"dataset.root={usps}", "dataset.shots=10", "bootstrap=5",
                              f"candidates=[{{name:lenet,weights:'{lenet}'}},{{name:lenet,weights:none}},"
                              "{name:lenet,weights:'/nowhere/missing.pth'}]")
    assert code == 0, err
    table = rank_table(tmp_path)
    assert len(table) == 3 and list(table["candidate"]) == ["lenet (lenet5_mnist.pth)", "lenet (none)",
                                                            "lenet (missing.pth)"]
    pretrained, random_init, broken = table.iloc[0], table.iloc[1], table.iloc[2]
    for score in ("logme", "hscore", "sfda", "knn", "probe"):
        assert pretrained[score] > random_init[score], score
        assert pretrained[f"{score}_rank"] == 1
    assert np.isfinite(pretrained["leep"]) and np.isnan(random_init["leep"])  # a random head is no source classifier
    assert pretrained["logme_low"] <= pretrained["logme"] <= pretrained["logme_high"]
    assert pretrained["feature_dim"] == 84 and pretrained["params"] == random_init["params"]
    assert "missing.pth" in broken["error"] and np.isnan(broken["logme"])
    assert "recommended: lenet (lenet5_mnist.pth) (best probe)" in out  # recommend=auto: the probe, when computed
    (folder,) = (tmp_path / "outputs" / "ranks").iterdir()
    recommended = json.loads((folder / "recommended.json").read_text())
    assert recommended["train_overrides"] == ["backbone.name=lenet", f"backbone.weights='{lenet}'"]
    assert "transfer train dataset=usps <the same dataset.* overrides> backbone.name=lenet" in out
    assert (folder / "rank.md").is_file() and (folder / "rank.png").stat().st_size > 0

    # The features come from the cache the second time: the same numbers, the pass skipped.
    code, _, err = transfer("rank", "dataset=usps", f"dataset.root={usps}", "dataset.shots=10", "bootstrap=5",
                            f"candidates=[{{name:lenet,weights:'{lenet}'}}]", "output_dir=again",
                            f"cache_dir={tmp_path / 'outputs' / 'cache' / 'features'}")
    assert code == 0, err
    (again,) = (tmp_path / "again" / "ranks").glob("*/rank.csv")
    assert pd.read_csv(again).iloc[0]["logme"] == pretrained["logme"]


def test_a_source_candidate_is_pretrained_once_and_scored_with_its_source_classifier(transfer, tmp_path):
    args = ("rank", "dataset.classes=[5,6,7,8,9]", "dataset.shots=10", "source=digits_0to4", "source.epochs=2",
            "candidates=[{name:small_cnn,weights:source}]", "bootstrap=0", "scores=[logme,leep,probe]")
    code, out, err = transfer(*args)
    assert code == 0, err
    assert "pretraining small_cnn on source digits" in out
    (made,) = (tmp_path / "outputs" / "cache" / "source").glob("*/model.safetensors")
    first = rank_table(tmp_path).iloc[0]
    assert first["candidate"] == "small_cnn (source)" and first["weights"] == str(made.resolve())
    assert np.isfinite(first["leep"]) and np.isfinite(first["logme"])  # the source task's head is its classifier
    assert f"backbone.weights='{made.resolve()}'" in out  # train it: the very body that was ranked
    code, out, err = transfer(*args, "hydra.run.dir=again")
    assert code == 0 and "source model from cache" in out and "pretraining" not in out
    assert pd.read_csv(tmp_path / "again" / "rank.csv").iloc[0][["logme", "leep", "probe"]].tolist() == first[["logme", "leep", "probe"]].tolist()


@pytest.mark.parametrize("args, message", [
    (["candidates=[]"], "candidates=[]"),
    (["candidates=[small_cnn]", "scores=[logme,magic]"], "scores=['logme', 'magic']"),
    (["candidates=[small_cnn]", "scores=[knn]", "recommend=logme"], "recommend='logme'"),
    (["candidates=[{name:small_cnn,wieghts:none}]"], "candidates[0]"),
    (["candidates=[{name:small_cnn,weights:source}]"], "weights=source needs the source task to pretrain on: source=NAME"),
    (["candidates=[{name:small_cnn,weights:source}]", "source=digits_0to4", "source.epochs=0"], "source.epochs=0"),
    (["candidates=[minilm]"], "candidates[0] name=minilm takes text but dataset=digits holds images"),
    (["candidates=[small_cnn]", "dataset.shots=1"], "fewer than 2 labelled training samples"),
    (["candidates=[small_cnn]", "validate=top3"], "validate='top3'"),
    (["candidates=[small_cnn]", "validate=all", "validate_method=scratch"], "validate_method='scratch'"),
])
def test_bad_input_is_refused_with_the_key_and_exit_2(transfer, tmp_path, args, message):
    code, _, err = transfer("rank", *args)
    assert code == 2 and message in err, err
    assert not list((tmp_path / "outputs").rglob("rank.csv"))


@pytest.mark.slow  # trains every candidate; validate's refusals stay in the fast tier
def test_validate_trains_the_candidates_and_measures_each_scores_order(transfer, tmp_path):
    from scipy import stats

    code, out, err = transfer("rank", "candidates=[small_cnn,{name:lenet,weights:none},{name:cifar_resnet20,weights:none}]",
                              "bootstrap=0", "validate=all", "validate_overrides=['trainer=debug']")
    assert code == 0, err
    (folder,) = (tmp_path / "outputs" / "ranks").iterdir()
    table = pd.read_csv(folder / "rank.csv")
    runs = sorted((folder / "validate").iterdir())
    assert len(runs) == 3 and table["measured_acc1"].notna().all()
    for run in runs:  # each measured number is the test top-1 its training run reported
        summary = pd.read_json(run / "summary.json", typ="series")
        assert summary["test"]["acc1"] in table["measured_acc1"].tolist()
        assert summary["method"] == "linear_probe"
    agreement = pd.read_csv(folder / "validation.csv").set_index("score")
    expected = stats.kendalltau(table["logme"], table["measured_acc1"], variant="b").statistic
    assert agreement.loc["logme", "kendall_tau_b"] == pytest.approx(expected)
    best = table["measured_acc1"].max()
    assert agreement.loc["knn", "top1_regret"] == pytest.approx(best - table.loc[table["knn"].idxmax(), "measured_acc1"])
    assert np.isnan(agreement.loc["leep", "kendall_tau_b"])  # no candidate has a source classifier


def test_bootstrap_keeps_every_class_and_the_interval_surrounds_the_estimate():
    labels = np.repeat(np.arange(4), [3, 5, 2, 7])
    for draw in _bootstrap_draws(labels, 10, seed=0):
        assert np.array_equal(np.bincount(labels[draw]), np.bincount(labels))
    low, high = shifted_interval(0.5, [0.60, 0.62, 0.58, 0.61, 0.59])  # resamples all biased upward
    assert low < 0.5 < high


def test_the_train_overrides_of_a_candidate_rebuild_it_in_transfer_train(compose_cfg):
    candidate = OmegaConf.merge(OmegaConf.structured(BackboneConfig),
                                {"name": "mobilenet_v2", "weights": "/w/m v2.safetensors", "cut": 14,
                                 "preprocess": {"crop": 96, "mean": [0.5, 0.5, 0.5]}})
    overrides = train_overrides(candidate)
    assert overrides == ["backbone.name=mobilenet_v2", "backbone.weights='/w/m v2.safetensors'",
                         "backbone.preprocess.crop=96", "backbone.preprocess.mean=[0.5,0.5,0.5]", "backbone.cut=14"]
    cfg = compose_cfg(*overrides)
    assert OmegaConf.to_container(cfg.backbone) == OmegaConf.to_container(candidate)

