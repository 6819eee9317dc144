"""Freeze depth per backbone family: stages cover the body, frozen stages stay put, the rest trains."""

import pytest
import torch
from conftest import build_method, classifier, entry
from torch import nn

from transfer_cli.data.transforms import InputSpec
from transfer_cli.errors import UserError
from transfer_cli.methods.finetune import Finetune
from transfer_cli.models.backbone import Classifier, build_backbone
from transfer_cli.models.stages import in_stage
from transfer_cli.optim import OPTIMIZERS, optimizer_entry

# timm families: stages come from timm's own group_matcher.
TIMM = ["timm/resnet18", "timm/convnext_atto", "timm/vit_tiny_patch16_224", "timm/efficientnet_b0",
        "timm/mobilenetv3_small_050"]
# One member of every family with its own stage rule, plus generic-fallback families.
FAMILIES = ["small_cnn", "lenet", "resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small",
            "efficientnet_b0", "convnext_tiny", "regnet_y_400mf", "densenet121", "vgg11_bn", "vit_b_16",
            "swin_t", "shufflenet_v2_x0_5", *TIMM]
STEP_FAMILIES = ["small_cnn", "lenet", "resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                 "convnext_tiny", "regnet_y_400mf", "densenet121", "vit_b_16", *TIMM]  # vgg: stages tested, step too slow


def build(name: str, num_classes: int = 4) -> Classifier:
    bb = build_backbone(name, "none", 3)
    size = bb.fixed_size or 32
    spec = InputSpec(channels=bb.channels, size=size, mean=[0.5] * bb.channels, std=[0.25] * bb.channels)
    return classifier(bb, num_classes, spec)


@pytest.mark.parametrize("name", FAMILIES)
def test_stages_cover_every_body_parameter_once(name):
    model = build(name)
    assert len(model.stages) >= 3, model.stages
    for pname, _ in model.body.named_parameters():
        owners = [i for i, s in enumerate(model.stages) if in_stage(pname, s)]
        assert len(owners) == 1, (pname, owners)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def one_step(method: Finetune, batch: int) -> None:
    size = method.model.spec.size
    torch.manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    y = torch.arange(batch) % 4
    optimizer = OPTIMIZERS.build(optimizer_entry(entry("optimizer", "adamw", lr=1e-2)), params=method.param_groups(1e-2, 0.01))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in method.parameters() if p.requires_grad}
    method.train()
    method.training_step((x, y))["loss"].backward()
    optimizer.step()


# ViT-B/16 (86M parameters at 224 px) takes seconds a step; the fast tier keeps timm's tiny ViT for that family.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vit_b_16" else n
                                  for n in STEP_FAMILIES])
def test_frozen_stages_do_not_change_and_the_rest_trains(name):
    torch.manual_seed(0)
    model = build(name)
    method = build_method("finetune", model, freeze=2)
    before = snapshot(model)
    one_step(method, batch=2 if name == "vit_b_16" else 4)
    after = snapshot(model)

    def changed(key: str) -> bool:
        return not torch.equal(before[key], after[key])

    for index, stage in enumerate(model.stages):
        keys = [f"body.{k}" for k in model.body.state_dict() if in_stage(k, stage)]
        learned = [k for k in keys if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        stats = [k for k in keys if k.endswith(("running_mean", "running_var"))]
        if index < 2:  # frozen: parameters and BatchNorm statistics untouched
            assert not any(changed(k) for k in keys), [k for k in keys if changed(k)]
        else:
            assert any(changed(k) for k in learned), f"stage {index} {stage} did not train"
            if stats:
                assert any(changed(k) for k in stats), f"BN statistics of stage {index} did not update"
    assert changed("head.0.weight") and changed("head.0.bias")


def test_freeze_all_trains_only_the_head_and_freeze_zero_trains_everything():
    model = build("resnet18")
    head = {id(p) for p in model.head.parameters()}
    method = build_method("finetune", model, freeze="all")
    assert {id(p) for p in method.parameters() if p.requires_grad} == head
    model = build("resnet18")
    build_method("finetune", model, freeze=0)
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_batchnorm_stays_in_eval_mode_after_train():
    model = build("resnet18")
    build_method("finetune", model, freeze=1).train()
    assert not model.body.bn1.training and model.body.layer1[0].bn1.training


def test_bn_frozen_keeps_every_batchnorm_fixed():
    model = build("small_cnn")
    method = build_method("finetune", model, freeze=0, bn="frozen")
    before = snapshot(model)
    one_step(method, batch=4)
    after = snapshot(model)
    norm_keys = [k for k in before if ".1." in k]  # block*.1 is each block's BatchNorm
    assert norm_keys and all(torch.equal(before[k], after[k]) for k in norm_keys)
    assert not torch.equal(before["body.block1.0.weight"], after["body.block1.0.weight"])


@pytest.mark.parametrize("depth", ["some", 2.5, True])
def test_freeze_of_the_wrong_type_is_refused_by_the_registry(depth):
    with pytest.raises(UserError, match=r"method.freeze=.* is not allowed for method 'finetune'. Allowed: int or one of all"):
        build_method("finetune", build("small_cnn"), freeze=depth)


@pytest.mark.parametrize("depth", [4, -1])
def test_freeze_out_of_range_names_the_stages(depth):
    with pytest.raises(UserError, match=r"method.freeze=.* is out of range: backbone=small_cnn has 3 stages "
                                         r"\(1=block1, 2=block2, 3=block3\). Allowed: 0..3 or all"):
        build_method("finetune", build("small_cnn"), freeze=depth)
