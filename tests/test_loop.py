"""The training loop's mechanics: accumulation, clipping, schedules, precision, reproducibility."""

import json
import math

import pytest
import torch
from conftest import build_method, classifier, entry

from transfer_cli.data.transforms import InputSpec
from transfer_cli.engine.device import Precision
from transfer_cli.engine.loop import State, fit
from transfer_cli.methods.finetune import Finetune
from transfer_cli.models.backbone import BACKBONES
from transfer_cli.optim import OPTIMIZERS, SCHEDULERS, optimizer_entry
from transfer_cli.train import run_train
from transfer_cli.validation import validate

CPU = torch.device("cpu")


def lenet_method(seed: int = 0) -> Finetune:
    torch.manual_seed(seed)
    bb = BACKBONES.get("lenet")()
    return build_method("finetune", classifier(bb, 10, InputSpec(channels=1, size=32, mean=[0.5], std=[0.5])))


def batches(n: int, size: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (size, 1, 32, 32), generator=g, dtype=torch.uint8),
             torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def train_once(method, loader, accumulate=1, grad_clip=None, lr=0.1):
    optimizer = OPTIMIZERS.build(optimizer_entry(entry("optimizer", "sgd", lr=lr, momentum=0.0, weight_decay=0.0,
                                                                 nesterov=False)),
                                 params=method.param_groups(lr, 0.0))
    scheduler = SCHEDULERS.build(entry("scheduler", "none"), optimizer=optimizer, total_steps=10, steps_per_epoch=10)
    state = State(method, optimizer, scheduler, max_epochs=1, steps_per_epoch=len(loader))
    return fit(state, loader, CPU, Precision("32", CPU), accumulate=accumulate, grad_clip=grad_clip)


def test_accumulating_two_half_batches_equals_one_full_batch():
    big = batches(1, 16)
    halves = [(big[0][0][:8], big[0][1][:8]), (big[0][0][8:], big[0][1][8:])]
    a, b = lenet_method(), lenet_method()
    state_a = train_once(a, big)
    state_b = train_once(b, halves, accumulate=2)
    assert state_a.step == state_b.step == 1
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), name


def test_gradient_clipping_bounds_the_update():
    method = lenet_method()
    before = torch.cat([p.detach().flatten().clone() for p in method.parameters()])
    train_once(method, batches(1, 16), grad_clip=1e-3, lr=1.0)
    after = torch.cat([p.detach().flatten() for p in method.parameters()])
    assert 0 < (after - before).norm() <= 1e-3 + 1e-6


def lrs(name: str, steps: int = 100, **kwargs) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = SCHEDULERS.build(entry("scheduler", name, **kwargs), optimizer=opt, total_steps=steps, steps_per_epoch=10)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
    values = lrs("cosine", warmup_epochs=1.0, min_lr_ratio=0.1)
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1, abs=1e-3)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_step_schedule_multiplies_by_gamma_every_step_epochs():
    values = lrs("step", step_epochs=3, gamma=0.5)
    assert values[29] == 1.0 and values[30] == 0.5 and values[60] == 0.25


def test_onecycle_peaks_at_the_configured_lr():
    values = lrs("onecycle", pct_start=0.3)
    assert max(values) == pytest.approx(1.0) and values[0] == pytest.approx(1 / 25) and values[-1] < 1e-3


@pytest.mark.slow  # bf16 autocast is emulated on CPU (seconds); the fast tier keeps the fp32 path
def test_bf16_mixed_precision_trains_on_cpu(compose_cfg, tmp_path, quiet_console):
    # half the digits: bf16 convolutions are slow on CPU, and the check is that it trains, not how well
    cfg = compose_cfg("trainer.precision=bf16-mixed", "trainer.epochs=2", "trainer.plots=false", "dataset.fraction=0.5")
    validate(cfg)
    summary = run_train(cfg, tmp_path, quiet_console)
    assert summary["precision"] == "bf16-mixed" and summary["test"]["acc1"] > 80
    assert math.isfinite(summary["test"]["loss"])


def test_same_seed_same_result(compose_cfg, tmp_path, quiet_console):
    results = []
    for run in ("a", "b"):
        cfg = compose_cfg("trainer.epochs=1", "trainer.deterministic=true", "trainer.plots=false", "seed=3")
        results.append(run_train(cfg, tmp_path / run, quiet_console)["test"])
    assert results[0]["loss"] == results[1]["loss"] and results[0]["acc1"] == results[1]["acc1"]
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["test"]["acc1"] == results[0]["acc1"]


def test_channels_last_and_gradient_accumulation_run_end_to_end(compose_cfg, tmp_path, quiet_console):
    cfg = compose_cfg("trainer.channels_last=true", "trainer.accumulate=2", "trainer.grad_clip=1.0",
                      "trainer.epochs=2", "trainer.plots=false", "scheduler=onecycle", "optimizer=sgd")
    summary = run_train(cfg, tmp_path, quiet_console)
    assert summary["test"]["acc1"] > 80


def test_loss_watch_names_the_first_non_finite_step_when_read_late():
    from transfer_cli.engine.loop import Diverged, LossWatch

    state = State(method=None, optimizer=None, scheduler=None, max_epochs=2, steps_per_epoch=10, epoch=1)
    watch = LossWatch(torch.device("cpu"))
    for batch, value in enumerate([2.0, 1.5, float("nan"), float("inf"), 0.5]):  # read only at the end,
        watch.update(torch.tensor(value), batch, step=10 + batch)               # as on a GPU
    with pytest.raises(Diverged, match=r"at epoch 2, batch 3 \(optimizer step 12\); last finite loss 1.5") as err:
        watch.check(state)
    assert err.value.last_finite == 1.5
