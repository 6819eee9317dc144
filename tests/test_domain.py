"""Domain adaptation pieces: gradient reversal, the DANN schedule, CORAL, MMD, label-free targets."""

import math

import pandas as pd
import pytest
import torch
from conftest import shared_path

from transfer_cli.methods.da_losses import coral_loss, dann_lambda, grad_reverse, mmd_loss
from transfer_cli.methods.domain import PairedLoader
from transfer_cli.train import run_train


def test_gradient_reversal_is_identity_forward_and_flips_and_scales_gradients():
    x = torch.randn(4, 3, requires_grad=True)
    weights = torch.randn(4, 3)
    (grad_reverse(x, 0.3) * weights).sum().backward()
    assert torch.allclose(x.grad, -0.3 * weights)
    assert torch.equal(grad_reverse(x, 0.3), x)
    y = torch.randn(5, requires_grad=True)
    grad_reverse(y, 2.0).sin().sum().backward()  # chain rule through the layer: -2 cos(y)
    assert torch.allclose(y.grad, -2.0 * y.detach().cos())


def test_dann_lambda_schedule():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)  # 0.9866
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)  # 0.99991


def test_coral_is_zero_for_identical_batches_and_positive_otherwise():
    torch.manual_seed(0)
    a = torch.randn(64, 8)
    assert coral_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert coral_loss(a, 3 * torch.randn(64, 8)).item() > 0.01


def test_mmd_is_zero_for_identical_batches_and_grows_with_a_shift():
    torch.manual_seed(0)
    a = torch.randn(64, 8)
    assert mmd_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert mmd_loss(a, a + 2.0).item() > mmd_loss(a, a + 0.5).item() > 0


def test_paired_loader_never_yields_target_labels_and_cycles_the_target():
    source = [(torch.zeros(2, 1), torch.tensor([1, 2]))] * 5
    target = [(torch.ones(2, 1), torch.tensor([-7, -7]))] * 2
    batches = list(PairedLoader(source, target))
    assert len(batches) == 5 and all(len(b) == 3 for b in batches)
    assert all(torch.equal(b[2], torch.ones(2, 1)) for b in batches)


@pytest.fixture
def da_overrides():
    shared_path("datasets", "mnist")
    shared_path("datasets", "usps")
    return ["experiment=mnist_usps", "dataset.root=" + str(shared_path("datasets", "mnist")),
            "target.dataset.root=" + str(shared_path("datasets", "usps")), "dataset.shots=20",
            "target.dataset.shots=20", "dataset.val_fraction=0.02", "trainer.epochs=2", "trainer.plots=false",
            "trainer.log_every=1000"]


@pytest.mark.slow  # real data from ../shared; the edit loop's runs use the bundled digits
def test_short_dann_run_on_real_digits_writes_target_metrics(compose_cfg, tmp_path, quiet_console, da_overrides):
    summary = run_train(compose_cfg(*da_overrides, "method=dann"), tmp_path, quiet_console)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert {"loss_cls", "loss_domain", "domain_acc", "lambda"} <= set(metrics.columns)
    assert metrics["split"].tolist().count("target_test") == 2
    assert 0 <= summary["target_test"]["acc1"] <= 100 and summary["target"] == "usps"


def test_mmd_stays_finite_when_features_collapse():
    features = torch.zeros(8, 4, requires_grad=True)
    loss = mmd_loss(features, features.clone())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
