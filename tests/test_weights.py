"""Pretrained weights: local files (safetensors / torch state dicts) and torchvision's cache."""

import pytest
import torch
import torchvision.models as tvm
from conftest import build_method, classifier, shared_path, train_in_process
from safetensors.torch import load_file, save_file

from transfer_cli.errors import UserError
from transfer_cli.models.backbone import BACKBONES
from transfer_cli.models.weights import weights_sidecar


def test_local_safetensors_with_module_prefix_loads_into_the_body(tmp_path):
    source = tvm.mobilenet_v3_small()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    bb = BACKBONES.get("mobilenet_v3_small")(weights=str(path))
    body = bb.body.state_dict()
    assert torch.equal(body["features.0.0.weight"], source.state_dict()["features.0.0.weight"])
    assert bb.weights_meta is not None and bb.weights_meta.crop == 224  # ImageNet preprocessing assumed


def test_local_torch_file_with_other_head_reports_and_keeps_the_rest(tmp_path):
    source = tvm.resnet18(num_classes=7)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    bb = BACKBONES.get("resnet18")(weights=str(path))
    assert torch.equal(bb.body.state_dict()["layer4.1.conv2.weight"], source.state_dict()["layer4.1.conv2.weight"])
    notes = "\n".join(bb.notes)
    assert "2 shape differs" in notes and "fc.weight" in notes
    assert bb.source_head is None  # the classifier stayed random: no source task to score with (LEEP, NCE)


def test_a_checkpoint_of_this_tool_is_a_backbone_with_its_source_classifier(tmp_path):
    """`transfer train` on digits 0-4, then its checkpoint as backbone.weights: the body, the 5-class head as
    the source classifier (what LEEP / NCE score with) and the normalisation it was trained with."""
    train_in_process(tmp_path / "src", "dataset.classes=[0,1,2,3,4]", "trainer.epochs=1", f"output_dir={tmp_path}")
    path = tmp_path / "src" / "checkpoints" / "best.safetensors"
    state = load_file(str(path))
    bb = BACKBONES.get("small_cnn")(weights=str(path))
    assert torch.equal(bb.body.state_dict()["block3.0.weight"], state["body.block3.0.weight"])
    assert bb.source_head.out_features == 5 and torch.equal(bb.source_head.weight, state["head.0.weight"])
    assert bb.notes[0].startswith("loaded 20/20 tensors")
    stated = weights_sidecar(str(path))
    assert set(stated) == {"mean", "std"} and stated["mean"] == pytest.approx(state["input.mean"].flatten().tolist())
    with pytest.raises(UserError, match="does not match backbone=lenet"):
        BACKBONES.get("lenet")(weights=str(path))


def test_weights_file_for_another_architecture_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(UserError, match=r"does not match backbone=resnet18: none of its 1 tensors fit"):
        BACKBONES.get("resnet18")(weights=str(path))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"backbone.weights='.*nope.safetensors': no such file"):
        BACKBONES.get("resnet18")(weights=str(tmp_path / "nope.safetensors"))


def test_enum_weights_come_from_a_prefilled_torch_home(tmp_path, monkeypatch):
    """With the file where torchvision expects it, enum weights load offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    torch.manual_seed(1)
    source = tvm.mobilenet_v3_small()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / weights.url.rsplit("/", 1)[1])
    bb = BACKBONES.get("mobilenet_v3_small")(weights="DEFAULT")
    assert torch.equal(bb.body.state_dict()["features.1.block.0.0.weight"],
                       source.state_dict()["features.1.block.0.0.weight"])
    assert bb.weights_meta.mean == [0.485, 0.456, 0.406] and bb.weights_meta.crop == 224


def test_enum_weights_not_cached_offline_name_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("torch.hub.download_url_to_file", _offline)
    with pytest.raises(UserError, match=r"not in the torch cache and could not be downloaded .* Put the file at "
                                         + str(tmp_path / "hub" / "checkpoints" / "mobilenet_v3_small")):
        BACKBONES.get("mobilenet_v3_small")(weights="IMAGENET1K_V1")


def _offline(*args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("network unreachable")


def test_unknown_enum_name_lists_the_real_ones():
    with pytest.raises(UserError, match=r"Allowed: none, DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"):
        BACKBONES.get("resnet50")(weights="IMAGENET22K")


def test_shared_imagenet_mobilenet_v2_loads_every_tensor():
    path = shared_path("weights", "imagenet_mobilenet_v2", "mobilenet_v2_imagenet1k_dequantized_fp32.safetensors")
    bb = BACKBONES.get("mobilenet_v2")(weights=str(path))
    assert "loaded 314/314 tensors" in bb.notes[0]
    assert bb.feature_dim == 1280


def test_shared_mnist_lenet5_loads_into_lenet():
    path = shared_path("weights", "mnist_lenet5", "lenet5_mnist.pth")
    bb = BACKBONES.get("lenet")(weights=str(path))
    assert "loaded 10/10 tensors" in bb.notes[0]
    assert bb.feature_dim == 84 and bb.channels == 1


def test_folded_batchnorm_weights_keep_bn_frozen_by_default():
    from transfer_cli.data.transforms import InputSpec

    path = shared_path("weights", "imagenet_mobilenet_v2", "mobilenet_v2_imagenet1k_dequantized_fp32.safetensors")
    spec = InputSpec(channels=3, size=32, mean=[0.5] * 3, std=[0.5] * 3)
    folded = build_method("finetune", classifier(BACKBONES.get("mobilenet_v2")(weights=str(path)), 10, spec))
    assert folded.has_folded_norms() and len(folded.frozen_norms) == 52
    assert not any(p.requires_grad for m in folded.frozen_norms for p in m.parameters())
    fresh = build_method("finetune", classifier(BACKBONES.get("mobilenet_v2")(), 10, spec))
    assert not fresh.has_folded_norms() and not fresh.frozen_norms
    forced = build_method("finetune", classifier(BACKBONES.get("mobilenet_v2")(weights=str(path)), 10, spec), bn="train")
    assert not forced.frozen_norms
