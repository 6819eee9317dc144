"""Every registered method on real digits: one step, what trains, what stays, what the optimizer holds."""

import copy
import math

import pytest
import torch
from conftest import build_method, entry
from torch import nn

from transfer_cli.config import DatasetConfig, HeadConfig
from transfer_cli.data.identity import input_identities
from transfer_cli.engine.device import Precision
from transfer_cli.engine.loop import State
from transfer_cli.methods.base import METHODS, DataContext
from transfer_cli.methods.distill import Teacher
from transfer_cli.optim import OPTIMIZERS, SCHEDULERS, optimizer_entry
from transfer_cli.pipeline import build_data, build_image_model, make_loader

CPU = torch.device("cpu")
# Settings each method is tested with. A newly registered method without an entry fails
# test_every_method_has_test_settings, so no method goes untested.
METHOD_SETTINGS = {
    "finetune": {"freeze": 1},
    "lp_ft": {"freeze": 1, "cache": False, "probe_iters": 30},
    "bitfit": {},
    "lora": {"rank": 2},
    "scratch": {},
    "linear_probe": {"solver": "sgd", "cache": False},
    "gradual_unfreeze": {"every_epochs": 1},
    "l2sp": {"alpha": 0.1, "beta": 0.01, "freeze": 1},
    "source_only": {},
    "dann": {"hidden": 32},
    "cdan": {"hidden": 32},
    "cdan_e": {"hidden": 32, "mcc_weight": 1.0},
    "coral": {},
    "dan": {},
    "mcc": {},
    "shot": {"source_epochs": 1},  # its source phase; the adaptation step is tested below
    "fixmatch_da": {"threshold": 0.5},
    "distill": {"teacher": "teacher.safetensors", "alpha": 0.5},  # setup gives it a copy of the student as teacher
}


def test_every_method_has_test_settings():
    assert set(METHODS.names()) == set(METHOD_SETTINGS)


def setup(name: str, **settings):
    torch.manual_seed(0)
    data_cfg = DatasetConfig(name="digits", batch_size=32)
    splits = build_data(data_cfg)
    model = build_image_model(data_cfg, splits, "small_cnn", "none", HeadConfig())
    teachers = [Teacher(settings["teacher"], copy.deepcopy(model), None)] if "teacher" in settings else None
    method = build_method(name, model, {"teachers": teachers} if teachers else None, **settings)

    def make(split, train):
        return make_loader(splits.split(split), model.spec, data_cfg, train, CPU)

    # The digits themselves serve as the "target domain" of the adaptation methods here: this test is
    # about mechanics; test_domain.py adapts MNIST to USPS.
    identity = input_identities(splits, model.spec)
    context = DataContext(CPU, Precision("32", CPU), identity, target=make)
    return method, method.loaders(make, context)


def optimizer_for(method):
    if method.manual_optimization:
        return None, None
    optimizer = OPTIMIZERS.build(optimizer_entry(entry("optimizer", "adamw", lr=1e-2)), params=method.param_groups(1e-2, 0.01))
    scheduler = SCHEDULERS.build(entry("scheduler", "none"), optimizer=optimizer, total_steps=10, steps_per_epoch=5)
    return optimizer, scheduler


def optimizer_params(optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("name", sorted(METHOD_SETTINGS))
def test_one_step_trains_exactly_the_trainable_parameters(name):
    method, loaders = setup(name, **METHOD_SETTINGS[name])
    optimizer, _ = optimizer_for(method)
    trainable = {id(p) for p in method.parameters() if p.requires_grad}  # + a DANN discriminator
    if optimizer:
        assert optimizer_params(optimizer) == trainable
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    method.train()
    out = method.training_step(next(iter(loaders["train"])))
    assert math.isfinite(out["loss"].item())
    if optimizer:
        out["loss"].backward()
        optimizer.step()
    for n, p in method.model.named_parameters():
        moved = not torch.equal(before[n], p)
        if id(p) in trainable:
            assert moved, f"{n} did not train"
        else:
            assert not moved, f"frozen {n} changed"
    assert any(not torch.equal(before[n], p) for n, p in method.model.head.named_parameters(prefix="head"))


def test_linear_probe_and_gradual_unfreeze_start_with_only_the_head_trainable():
    for name in ("linear_probe", "gradual_unfreeze"):
        method, _ = setup(name, **METHOD_SETTINGS[name])
        assert {id(p) for p in method.model.parameters() if p.requires_grad} == {
            id(p) for p in method.model.head.parameters()}


def test_gradual_unfreeze_adds_one_stage_per_epoch_to_the_optimizer_on_schedule():
    method, _ = setup("gradual_unfreeze", every_epochs=1, layer_decay=0.5)
    optimizer, scheduler = optimizer_for(method)
    state = State(method, optimizer, scheduler, max_epochs=5, steps_per_epoch=1)
    (hook,) = method.hooks()
    for epoch, expected_frozen in ((0, 2), (1, 1), (2, 0), (3, 0)):
        state.epoch = epoch
        hook.after_epoch(state)
        assert method.frozen_stages == expected_frozen
        trainable = {id(p) for p in method.model.parameters() if p.requires_grad}
        assert optimizer_params(optimizer) == trainable
    lrs = sorted({round(g["lr"], 12) for g in optimizer.param_groups})
    # stage i of 3 trains at lr * 0.5 ** (3 - i); the head at lr
    assert lrs == pytest.approx([1.25e-3, 2.5e-3, 5e-3, 1e-2])
    assert not method.frozen_norms  # every BatchNorm trains again once its stage is unfrozen


def test_fixmatch_da_pseudo_labels_only_target_images_above_the_threshold():
    for threshold, rate in ((0.0, 100.0), (0.99, 0.0)):  # the untrained model is far from 99 % sure of anything
        method, loaders = setup("fixmatch_da", threshold=threshold)
        method.train()
        method.progress = 1.0
        out = method.training_step(next(iter(loaders["train"])))
        assert out["pseudo_rate"].item() == rate
        assert (out["loss_pseudo"].item() > 0) == (rate > 0)
        assert out["logits"].shape == (len(out["labels"]), 10)  # train accuracy is on the plain source batch


def test_shot_adaptation_step_trains_the_body_on_target_batches_with_the_head_frozen():
    method, loaders = setup("shot", source_epochs=1)
    optimizer, scheduler = optimizer_for(method)
    state = State(method, optimizer, scheduler, max_epochs=2, steps_per_epoch=1, epoch=1)
    for hook in method.hooks():
        hook.before_epoch(state)
    assert method.adapting and method.centroids.shape[0] == 10
    head = [p.detach().clone() for p in method.model.head.parameters()]
    body = [p.detach().clone() for p in method.model.body.parameters()]
    method.train()
    x_source, y_source, x_target = next(iter(loaders["train"]))
    out = method.training_step((x_source * 0 + 255, y_source, x_target))  # the source batch is never used
    assert out["labels"] is None and {"loss_im", "loss_pseudo"} <= set(out)
    out["loss"].backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(head, method.model.head.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(body, method.model.body.parameters(), strict=True))


def test_layer_decay_and_backbone_lr_mult_scale_each_stage():
    method, _ = setup("finetune", freeze=0, layer_decay=0.5, backbone_lr_mult=0.1)
    groups = method.param_groups(1.0, 0.0)
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    for index in range(3):
        for p in method.model.stage_parameters(index):
            assert by_param[id(p)] == pytest.approx(0.1 * 0.5 ** (3 - index))
    assert all(by_param[id(p)] == 1.0 for p in method.model.head.parameters())


def test_l2sp_penalty_is_zero_at_the_start_and_grows_as_weights_move():
    method, loaders = setup("l2sp", alpha=0.1, beta=0.0, freeze=0)
    to_start, head = method.penalties()
    assert to_start.item() == 0.0 and head.item() == 0.0
    optimizer, _ = optimizer_for(method)
    out = method.training_step(next(iter(loaders["train"])))
    assert {"loss_ce", "loss_l2sp", "loss_head_l2"} <= set(out)
    out["loss"].backward()
    optimizer.step()
    assert method.penalties()[0].item() > 0


class CountingBody(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.inner, self.calls = body, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def probe_with_counter(cache_dir, image_size=None, seed=0, precision="32"):
    torch.manual_seed(seed)
    data_cfg = DatasetConfig(name="digits", batch_size=64, image_size=image_size)
    splits = build_data(data_cfg)
    model = build_image_model(data_cfg, splits, "small_cnn", "none", HeadConfig())
    method = build_method("linear_probe", model, solver="lbfgs", cache_dir=str(cache_dir))
    counter = CountingBody(method.model.body)
    method.model.body = counter

    def make(split, train):
        return make_loader(splits.split(split), model.spec, data_cfg, train, CPU)

    identity = input_identities(splits, model.spec)
    loaders = method.loaders(make, DataContext(CPU, Precision(precision, CPU), identity))
    torch.manual_seed(1)
    method.model.head.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    for _ in range(3):
        method.training_step(next(iter(loaders["train"])))
    return counter.calls, [p.detach().clone() for p in method.model.head.parameters()]


def test_feature_cache_skips_the_backbone_on_the_second_run_with_identical_results(tmp_path):
    calls, head = probe_with_counter(tmp_path)
    assert calls > 0 and len(list(tmp_path.glob("*.safetensors"))) == 3  # train, val, test
    calls_again, head_again = probe_with_counter(tmp_path)
    assert calls_again == 0
    assert all(torch.equal(a, b) for a, b in zip(head, head_again, strict=True))


def test_feature_cache_is_invalidated_by_other_preprocessing_weights_or_precision(tmp_path):
    _, head = probe_with_counter(tmp_path)
    calls_resized, _ = probe_with_counter(tmp_path, image_size=16)
    assert calls_resized > 0
    calls_other_weights, _ = probe_with_counter(tmp_path, seed=5)  # another random initialisation
    assert calls_other_weights > 0
    calls_bf16, head_bf16 = probe_with_counter(tmp_path, precision="bf16-mixed")
    assert calls_bf16 > 0 and not all(torch.equal(a, b) for a, b in zip(head, head_bf16, strict=True))
    assert len(list(tmp_path.glob("*.safetensors"))) == 12
    _, head_again = probe_with_counter(tmp_path)  # fp32 again: its own features, not the bf16 ones
    assert all(torch.equal(a, b) for a, b in zip(head, head_again, strict=True))


def test_lp_ft_starts_fine_tuning_from_a_fitted_probe_head_and_trains_it_at_the_backbone_rate():
    method, loaders = setup("lp_ft", cache=False, probe_iters=50)
    # the probe head alone already classifies the train features far above chance (10 classes)
    assert method.describe()["probe_train_acc1"] > 50
    fresh, _ = setup("finetune")
    assert not torch.equal(method.model.head[-1].weight, fresh.model.head[-1].weight)
    rates = {round(g["lr"] / 1e-2, 6) for g in method.param_groups(1e-2, 0.01)}
    assert rates == {0.1}  # the fitted head moves at the backbone's 0.1x too, not at 1x


def test_linear_probe_l2_auto_picks_the_best_validation_strength():
    method, _ = setup("linear_probe", cache=False, l2="auto")
    scores = method.describe()["l2_val_acc1"]
    assert len(scores) == 7 and method.l2 in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    assert scores[f"{method.l2:g}"] == max(scores.values())
    assert scores["10"] < max(scores.values())  # the strongest penalty underfits: the grid matters
    sgd, _ = setup("linear_probe", solver="sgd", l2="auto", cache=False)  # sgd regularises through weight decay: nothing to pick
    assert sgd.l2 == "auto" and "l2_val_acc1" not in sgd.describe()


def test_bitfit_trains_only_biases_and_the_head():
    method, loaders = setup("bitfit")
    trainable = [n for n, p in method.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("head.") or n.endswith("bias") for n in trainable)
    assert any(n.startswith("body.") for n in trainable)
    share = method.describe()["params_trainable"] / method.describe()["params_total"]
    assert share < 0.2


@pytest.mark.parametrize(("name", "weights", "body_scale"), [
    ("finetune", "none", 1.0),  # a random body learns at the head's rate
    ("finetune", "source", 1.0),  # a body this tool pretrained on nearby data, with the same optimizer
    ("finetune", "IMAGENET1K_V1", 0.1),  # weights from elsewhere: a tenth, so a random head cannot wreck them
    ("gradual_unfreeze", "../weights/lenet.safetensors", 0.1),
    ("l2sp", "DEFAULT", 0.1),
])
def test_backbone_lr_mult_auto_protects_pretrained_bodies(name, weights, body_scale):
    """The defaults (method.backbone_lr_mult=auto) give the body body_scale x the head's learning rate."""
    from dataclasses import replace

    data_cfg = DatasetConfig(name="digits")
    model = build_image_model(data_cfg, build_data(data_cfg), "small_cnn", "none", HeadConfig())
    model.recipe = replace(model.recipe, weights=weights)  # what the body started from, as a run records it
    method = build_method(name, model)
    scales = method.lr_scale()  # learning-rate multiplier of every body parameter (the head's is 1)
    body = [p for p in model.body.parameters()]
    assert {id(p) for p in model.head.parameters()}.isdisjoint(scales)
    assert body and all(scales[id(p)] == pytest.approx(body_scale) for p in body)
    assert method.describe()["backbone_lr_mult"] == body_scale
