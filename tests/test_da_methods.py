"""The stronger domain-adaptation pieces: CDAN's conditioning, MCC, SHOT's IM loss and centroids, the
label-free validators, checkpoint selection by validator, RGB models for grayscale sources, colour digits,
and the alignment analysis (t-SNE + proxy A-distance)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import invoke, shared_path

from transfer_cli.data.augment import affine_batch, strong_colour_batch
from transfer_cli.data.color_digits import blend_digits, make_color_digits
from transfer_cli.engine.metrics import Meter
from transfer_cli.engine.validators import (
    entropy,
    information_maximization,
    soft_neighborhood_density,
    validator_picks,
)
from transfer_cli.methods.da_losses import ConditionalMap, im_loss, mcc_loss
from transfer_cli.methods.self_training import pseudo_label_loss
from transfer_cli.methods.shot import class_centroids, nearest_centroid
from transfer_cli.reporting.alignment import proxy_a_distance
from transfer_cli.train import run_train


def test_mcc_is_zero_for_a_confident_diverse_batch_and_maximal_for_a_confused_one():
    confident = torch.eye(4).repeat(2, 1) * 50  # 8 samples, each sure of its own class, every class used
    assert mcc_loss(confident).item() == pytest.approx(0.0, abs=1e-6)
    confused = torch.zeros(8, 4)  # every prediction uniform: each row of the confusion matrix is uniform
    assert mcc_loss(confused).item() == pytest.approx(3 / 4, abs=1e-6)
    pairs = torch.tensor([[9.0, 9.0, -9.0, -9.0]] * 4 + [[-9.0, -9.0, 9.0, 9.0]] * 4)  # 0 <-> 1, 2 <-> 3 only
    assert mcc_loss(pairs).item() == pytest.approx(1 / 2, abs=0.01)  # half of each row is off the diagonal


def test_conditional_map_is_the_outer_product_and_randomizes_large_inputs():
    exact = ConditionalMap(feature_dim=5, classes=3)
    f, g = torch.randn(2, 5), torch.softmax(torch.randn(2, 3), 1)
    out = exact(f, g)
    assert out.shape == (2, 15) and exact.out_features == 15
    assert torch.allclose(out[1].view(3, 5), torch.outer(g[1], f[1]))
    randomized = ConditionalMap(feature_dim=500, classes=10, random_dim=1024)  # 5000 > 4096
    assert randomized.randomized and randomized(torch.randn(4, 500), torch.rand(4, 10)).shape == (4, 1024)


def test_im_loss_and_validators_on_hand_made_predictions():
    diverse = torch.eye(4) * 60  # confident, one sample per class
    assert im_loss(diverse).item() == pytest.approx(-math.log(4), abs=1e-5)
    collapsed = torch.tensor([[60.0, 0, 0, 0]] * 4)  # confident, all the same class
    assert im_loss(collapsed).item() == pytest.approx(0.0, abs=1e-5)
    uniform = torch.full((4, 4), 0.25)
    assert entropy(uniform).tolist() == pytest.approx([math.log(4)] * 4)
    assert information_maximization(uniform).item() == pytest.approx(0.0, abs=1e-6)


def test_snd_is_deterministic_and_higher_for_dense_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(5)[torch.arange(200) % 5]
    clustered = (centres * 8 + 0.1 * torch.randn(200, 5, generator=generator)).softmax(1)
    scattered = torch.randn(200, 5, generator=generator).mul(3).softmax(1)
    assert soft_neighborhood_density(clustered).item() == soft_neighborhood_density(clustered).item()
    assert soft_neighborhood_density(clustered) > soft_neighborhood_density(scattered)


def test_validator_picks_follow_each_validator_from_the_first_eligible_epoch():
    rows = []
    for epoch, (val, ent, im, snd, target) in enumerate(
            [(99, 0.1, 2.0, 9.0, 40.0), (90, 0.5, 1.0, 5.0, 70.0), (95, 0.3, 1.5, 6.0, 80.0), (80, 0.3, 1.9, 4.0, 60.0)],
            start=1):
        rows += [{"epoch": epoch, "split": "val", "acc1": float(val)},
                 {"epoch": epoch, "split": "target_train", "entropy": ent, "im": im, "snd": snd},
                 {"epoch": epoch, "split": "target_test", "acc1": target}]
    picks = {p["validator"]: (p["epoch"], p["target_test_acc1"]) for p in validator_picks(rows, first_epoch=2)}
    assert picks == {"val_acc1": (3, 80.0), "target_entropy": (3, 80.0),  # tie 0.3: the earlier epoch
                     "target_im": (4, 60.0), "target_snd": (3, 80.0), "last": (4, 60.0),
                     "oracle (target labels)": (3, 80.0)}


def test_shot_centroids_label_separable_features_by_cluster():
    features = torch.cat([torch.tensor([[5.0, 0, 0]]).repeat(10, 1), torch.tensor([[0, 5.0, 0]]).repeat(10, 1)])
    features += 0.1 * torch.rand(20, 3, generator=torch.Generator().manual_seed(0))
    probs = torch.tensor([[0.6, 0.4]] * 10 + [[0.4, 0.6]] * 10)  # weak but right predictions
    centroids = class_centroids(features, probs)
    assert nearest_centroid(features, centroids).tolist() == [0] * 10 + [1] * 10
    assert torch.allclose(centroids.norm(dim=1), torch.ones(2))


def test_meter_averages_accuracy_over_labelled_steps_only():
    meter = Meter()
    meter.update({"loss": torch.tensor(1.0), "logits": torch.eye(2) * 5, "labels": torch.tensor([0, 1])})
    meter.update({"loss": torch.tensor(3.0), "logits": torch.eye(2) * 5, "labels": None})
    out = meter.compute()
    assert out["acc1"] == 100.0 and out["loss"] == 2.0


def test_affine_batch_draws_per_image_and_keeps_dtype():
    torch.manual_seed(0)
    x = torch.zeros(16, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 8:20, 12:16] = 255
    out = affine_batch(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert len({bytes(image.numpy()) for image in out}) == 16  # a different draw for each image
    assert abs(out.float().mean().item() - x.float().mean().item()) < 0.35 * x.float().mean().item()


def test_pseudo_label_loss_counts_only_confident_weak_predictions_over_the_whole_batch():
    weak = torch.tensor([[0.0, 0.0, 9.0], [1.0, 1.1, 1.0]])  # sure of class 2 / unsure
    strong = torch.tensor([[0.0, 2.0, 1.0], [5.0, -5.0, 0.0]])
    loss, passed = pseudo_label_loss(weak, strong, threshold=0.95)
    assert passed.item() == 0.5
    assert loss.item() == pytest.approx(F.cross_entropy(strong[:1], torch.tensor([2])).item() / 2, abs=1e-6)
    none, nobody = pseudo_label_loss(weak, strong, threshold=1.0001)  # a threshold nothing reaches: no loss
    assert none.item() == 0.0 and nobody.item() == 0.0


def test_fixmatch_da_refuses_a_text_model(tmp_path):
    result = invoke("train", "dataset=sms_spam", f"dataset.root={shared_path('datasets', 'sms_spam')}", "backbone=tfidf",
                     "method=fixmatch_da", "target=usps", "target.dataset.name=rt_polarity",
                     f"target.dataset.root={shared_path('datasets', 'rt_polarity')}", f"output_dir={tmp_path}",
                     f"hydra.run.dir={tmp_path / 'run'}", "trainer.progress=none", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "method=fixmatch_da learns from strong views of images" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_strong_colour_batch_colours_gray_digits_and_draws_per_image():
    torch.manual_seed(0)
    digits = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    digits[:, :, 6:22, 12:16] = 255
    out = strong_colour_batch(digits, channels=3, cutout=0.25)
    assert out.shape == (64, 3, 28, 28) and out.dtype == torch.uint8
    assert len({bytes(image.numpy()) for image in out}) == 64
    corners = out[:, :, 0, 0].float().mean(1)  # background: dark as MNIST, or bright when inverted
    assert (corners > 127).any() and (corners < 127).any()
    assert (out[:, 0] != out[:, 1]).any(), "no image was coloured"
    assert ((out == 128).all(1).sum((1, 2)) >= 7 * 7).float().mean() > 0.9  # the mid-gray cutout square
    assert strong_colour_batch(digits, channels=1).shape == (64, 1, 28, 28)


def test_proxy_a_distance_separates_shifted_domains_from_identical_ones():
    rng = np.random.default_rng(0)
    same_a, same_b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    assert abs(proxy_a_distance(same_a, same_b)[1]) < 0.3
    error, distance = proxy_a_distance(same_a, same_b + 4.0)
    assert error < 0.01 and distance > 1.95


def test_blend_digits_makes_reproducible_colour_images():
    digits = torch.zeros(4, 28, 28, dtype=torch.uint8)
    digits[:, 10:18, 10:18] = 255
    first, again = blend_digits(digits, seed=3), blend_digits(digits, seed=3)
    assert first.shape == (4, 3, 28, 28) and first.dtype == torch.uint8 and torch.equal(first, again)
    assert not torch.equal(first[:, 0], first[:, 1])  # colour, not gray repeated


DA_METHODS = ["source_only", "dann", "cdan", "cdan_e", "coral", "dan", "mcc", "shot", "fixmatch_da"]


@pytest.fixture
def da_overrides():
    return ["experiment=mnist_usps", "dataset.root=" + str(shared_path("datasets", "mnist")),
            "target.dataset.root=" + str(shared_path("datasets", "usps")), "dataset.shots=20",
            "target.dataset.shots=20", "dataset.val_fraction=0.02", "trainer.epochs=3", "trainer.plots=false",
            "trainer.deterministic=true", "method.source_epochs=1"]


def _method_overrides(method: str, base: list[str]) -> list[str]:
    extra = [o for o in base if not o.startswith("method.source_epochs")] if method != "shot" else base
    return [*extra, f"method={method}"]


@pytest.mark.slow  # 18 real MNIST -> USPS runs
@pytest.mark.parametrize("method", DA_METHODS)
def test_no_target_label_reaches_any_da_method(method, compose_cfg, tmp_path, quiet_console, da_overrides,
                                               monkeypatch):
    """Training with the target's train labels replaced by garbage gives exactly the same model."""
    import transfer_cli.data.tasks as tasks

    # four of the ten classes: the property is the same, and the 10k MNIST test images become 4k
    overrides = [*_method_overrides(method, da_overrides), "dataset.classes=[0,1,2,3]",
                 "target.dataset.classes=[0,1,2,3]"]
    first = run_train(compose_cfg(*overrides), tmp_path / "a", quiet_console)
    original, scrambled = tasks.few_shot, []

    def garbage_target_labels(dataset, shots, seed):
        subset = original(dataset, shots, seed)
        base = subset
        while not hasattr(base, "images"):
            base = base.dataset
        if base.images.shape[-1] == 16:  # USPS, the target domain
            base.targets = torch.randint(0, 10, base.targets.shape, generator=torch.Generator().manual_seed(9))
            scrambled.append(len(base))
        return subset

    monkeypatch.setattr(tasks, "few_shot", garbage_target_labels)
    second = run_train(compose_cfg(*overrides), tmp_path / "b", quiet_console)
    assert scrambled, "the target's train labels were never replaced: the test proved nothing"
    for key in ("loss", "acc1"):
        assert second["target_test"][key] == first["target_test"][key] and second["test"][key] == first["test"][key]
    assert second["selection"] == first["selection"]  # the label-free validators never read labels either


def test_select_by_validator_keeps_that_epoch_and_reports_every_pick(compose_cfg, tmp_path, quiet_console,
                                                                     da_overrides):
    summary = run_train(compose_cfg(*da_overrides, "method=shot", "trainer.select=target_im"), tmp_path, quiet_console)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    validators = metrics[metrics["split"] == "target_train"].set_index("epoch")
    eligible = validators.loc[2:]  # SHOT's source epoch (1) is never kept
    assert summary["best"]["split"] == "target_train" and summary["best"]["metric"] == "im"
    assert summary["best"]["epoch"] == int(eligible["im"].idxmax())
    target = metrics[metrics["split"] == "target_test"].set_index("epoch")["acc1"]
    assert summary["at_best"]["target_test"]["acc1"] == target[summary["best"]["epoch"]]
    picks = pd.read_csv(tmp_path / "validators.csv")
    assert picks["validator"].tolist() == ["val_acc1", "target_entropy", "target_im", "target_snd", "last",
                                           "oracle (target labels)"]
    assert picks.set_index("validator").loc["oracle (target labels)", "target_test_acc1"] == target.loc[2:].max()


@pytest.fixture(scope="module")
def color_digits(tmp_path_factory):
    return make_color_digits(tmp_path_factory.mktemp("color_digits"), str(shared_path("datasets", "mnist")),
                             train=200, test=100)


@pytest.mark.slow  # the real-data DA run through the binary
def test_rgb_model_from_a_grayscale_source_adapts_to_colour_digits_and_analyzes(color_digits, tmp_path):
    run = tmp_path / "run"
    result = invoke("train", "experiment=mnist_usps", "method=cdan_e", f"output_dir={tmp_path}",
                     f"hydra.run.dir={run}", "dataset.root=" + str(shared_path("datasets", "mnist")),
                     "dataset.shots=20", "target=usps", "target.dataset.name=imagefolder",
                     f"target.dataset.root={color_digits}", "target.dataset.augment=none", "target.dataset.shots=null",
                     "target.dataset.val_fraction=0", "target.dataset.batch_size=64", "backbone.in_channels=3",
                     "trainer.epochs=2", "trainer.analyze=true", "trainer.progress=none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from safetensors import safe_open

    with safe_open(str(run / "checkpoints" / "best.safetensors"), "pt") as f:
        assert f.get_tensor("body.conv1.0.weight").shape[1] == 3  # an RGB model, trained on grayscale MNIST
    sidecar = json.loads((run / "checkpoints" / "best.json").read_text())
    assert sidecar["recipe"]["data_channels"] == 3
    alignment = pd.read_csv(run / "alignment.csv")
    assert alignment[["source", "target"]].values.tolist() == [["mnist", "imagefolder"]]
    assert alignment["source_samples"][0] == 1000 and alignment["target_samples"][0] == 100
    assert -2.0 <= alignment["proxy_a_distance"][0] <= 2.0 and (run / "features.png").stat().st_size > 10_000

    analysis = tmp_path / "analysis"
    result = invoke("analyze", f"checkpoint={run}/checkpoints/best.safetensors", "samples=300",
                     f"hydra.run.dir={analysis}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(analysis / "alignment.csv")
    assert table["source_samples"][0] == 300 and table["target_samples"][0] == 100
    assert (analysis / "features.png").is_file()


def _mnist(*overrides: str) -> list[str]:
    return ["experiment=mnist_usps", "dataset.root=" + str(shared_path("datasets", "mnist")),
            "target.dataset.root=" + str(shared_path("datasets", "usps")), *overrides]


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.select=best"], "trainer.select"),
    (["trainer.select=target_snd"], "has none: add target=NAME"),
    (["trainer.analyze=true"], "no target domain"),
    (["backbone=resnet18", "backbone.in_channels=1"], "fixed first layer that takes 3 channels"),
    (["backbone.in_channels=2"], "backbone.in_channels"),
])
def test_bad_da_settings_exit_2_naming_the_key(overrides, message, tmp_path, transfer):
    code, _, err = transfer("train", *overrides, f"output_dir={tmp_path}", "trainer.progress=none")
    assert code == 2, err
    assert message in " ".join(err.split())


def test_shot_with_no_epoch_left_to_adapt_exits_2(tmp_path, transfer):
    # its own test: the paths under ../shared are looked up when it runs (a skip at collection is an error)
    overrides = _mnist("method=shot", "method.source_epochs=5", "trainer.epochs=5", "dataset.shots=5")
    code, _, err = transfer("train", *overrides, f"output_dir={tmp_path}", "trainer.progress=none")
    assert code == 2, err
    assert "leaves no epoch" in " ".join(err.split())


def test_sweep_summary_flags_negative_transfer_against_source_only():
    from transfer_cli.reporting.sweep import add_gain_over_source_only

    grouped = pd.DataFrame({"backbone": ["a", "a", "b", "b"], "method": ["dann", "source_only", "source_only", "dann"],
                            "target_test_acc1_mean": [80.0, 70.0, 60.0, 55.0]})
    gains = add_gain_over_source_only(grouped, ["backbone", "method", "seed"])["target_gain_vs_source_only"]
    assert gains.tolist() == [10.0, 0.0, 0.0, -5.0]  # compared within the same backbone
    no_baseline = grouped[grouped["method"] == "dann"]
    assert "target_gain_vs_source_only" not in add_gain_over_source_only(no_baseline, ["backbone", "method"])
