"""Every torchvision classification model, by name, with torchvision's own weights enums and cache."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm

from transfer_cli.data.transforms import WeightsMeta
from transfer_cli.errors import UserError, choices
from transfer_cli.models.backbone import BACKBONES, Backbone, backbone_from_classifier
from transfer_cli.models.stages import torchvision_stages
from transfer_cli.models.weights import looks_like_path

_FIXED_SIZE = {"vit_": 224, "maxvit_": 224}
_MIN_SIZE = {"inception_v3": 75, "googlenet": 32}
_NO_AUX = ("googlenet", "inception_v3")  # auxiliary heads only matter for their original training recipe


def _weights_enum(name: str, value: str) -> Any:
    enum = tvm.get_model_weights(name)
    if value == "DEFAULT":
        return enum.DEFAULT
    member = value.split(".")[-1]
    if member in enum.__members__:
        return enum[member]
    raise UserError(
        f"backbone.weights={value!r} is not a weights name for backbone={name}. Allowed: none, DEFAULT, "
        f"{choices(m for m in enum.__members__ if m != 'DEFAULT')}, or a path to a .safetensors / torch state-dict file."
    )


def _meta(weights: Any) -> WeightsMeta:
    preset = weights.transforms()
    return WeightsMeta(
        crop=int(preset.crop_size[0]),
        resize=int(preset.resize_size[0]),
        mean=list(preset.mean),
        std=list(preset.std),
        interpolation=preset.interpolation.value,
    )


def _cache_path(weights: Any) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def build_torchvision(name: str, weights: str = "none") -> Backbone:
    kwargs: dict[str, Any] = {}
    if name in _NO_AUX:
        kwargs["aux_logits"] = False
        if weights == "none":
            kwargs["init_weights"] = True
    enum_weights = None
    if weights != "none" and not looks_like_path(weights):
        enum_weights = _weights_enum(name, weights)
    try:
        model = tvm.get_model(name, weights=enum_weights, **kwargs)
    except (urllib.error.URLError, OSError) as err:
        raise UserError(
            f"backbone.weights={weights} for backbone={name} is not in the torch cache and could not be "
            f"downloaded ({err}). Put the file at {_cache_path(enum_weights)} (TORCH_HOME sets the cache root) "
            "or pass a local file as backbone.weights=PATH."
        ) from None
    meta_source = enum_weights
    file_weights = "none"
    if enum_weights is None and weights != "none":
        file_weights = weights
        # A local file for a torchvision architecture is almost always ImageNet-trained: use the
        # architecture's default preprocessing (dataset.mean/std/image_size override it).
        meta_source = tvm.get_model_weights(name).DEFAULT
    return backbone_from_classifier(
        name, model, file_weights, lambda body: torchvision_stages(name, body), channels=3,
        min_size=next((v for k, v in _MIN_SIZE.items() if name.startswith(k)), 32),
        fixed_size=next((v for k, v in _FIXED_SIZE.items() if name.startswith(k)), None),
        weights_meta=_meta(meta_source) if meta_source is not None else None,
    )


def _register(name: str) -> None:
    BACKBONES.add(name, lambda weights="none": build_torchvision(name, weights))


_NOT_CLASSIFIERS = ("squeezenet",)  # their classifier is a convolution, not a replaceable linear layer
for _name in tvm.list_models(module=tvm):
    if not _name.startswith(_NOT_CLASSIFIERS):
        _register(_name)
