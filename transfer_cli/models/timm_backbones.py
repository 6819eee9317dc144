"""Any timm model as a backbone: ``backbone.name=timm/<model>[.<tag>]`` (the Hugging Face hub's own naming).

timm builds the model headless (``num_classes=0``: pooled features out), its ``pretrained_cfg`` says how
the weights were trained to see images (input size, crop_pct, mean/std), and its ``group_matcher``
splits the parameters into stages the same way timm's layer-wise LR decay does, for every family.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from transfer_cli.data.transforms import INTERPOLATIONS, WeightsMeta
from transfer_cli.errors import UserError
from transfer_cli.models.backbone import BACKBONES, Backbone
from transfer_cli.models.stages import Stage, complete_stages, generic_stages
from transfer_cli.models.weights import load_weights_file, looks_like_path

PREFIX = "timm/"
PRETRAINED = ("pretrained", "DEFAULT")  # backbone.weights values that ask timm for the tag's weights


def _create(model_name: str, pretrained: bool) -> nn.Module:
    import timm  # here: importing timm costs a second that runs without it should not pay

    architecture = model_name.split(".")[0]
    if not timm.is_model(architecture):
        family = architecture.split("_")[0]
        close = (timm.list_models(f"{family}*") or timm.list_models(f"*{family}*"))[:12]
        raise UserError(f"backbone.name={PREFIX}{model_name}: timm has no model {architecture!r}. "
                        f"Similar names: {', '.join(close) or 'none'} (timm.list_models() lists all).")
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=0)
    except RuntimeError as err:
        if "tag" in str(err).lower() or "pretrained" in str(err).lower():
            raise UserError(f"backbone.name={PREFIX}{model_name}: {err}") from None
        raise
    except OSError as err:  # huggingface_hub: offline and not in the cache
        from huggingface_hub.constants import HF_HUB_CACHE

        raise UserError(
            f"backbone.weights=pretrained for backbone.name={PREFIX}{model_name}: the weights are not in the "
            f"Hugging Face cache ({HF_HUB_CACHE}; HF_HOME moves it) and could not be downloaded ({type(err).__name__}). "
            "Download them once with network access, or pass a local file as backbone.weights=PATH."
        ) from None


def _meta(model: nn.Module) -> WeightsMeta:
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)
    crop = int(config["input_size"][-1])
    return WeightsMeta(crop=crop, resize=int(math.floor(crop / config.get("crop_pct", 0.875))),
                       mean=list(config["mean"]), std=list(config["std"]),
                       interpolation=config.get("interpolation") if config.get("interpolation") in INTERPOLATIONS else None)


def timm_stages(model: nn.Module) -> list[Stage]:
    """Stages from timm's coarse ``group_matcher`` (stem, then each stage or block, then the final norm)."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        return generic_stages(model)
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [list(names) for _, names in sorted(groups.items())]


def build_timm(model_name: str, weights: str = "none") -> Backbone:
    """``weights``: none (random init), pretrained / DEFAULT (the tag's weights through the Hugging Face
    cache), or a local file (a timm state dict; its head keys are ignored)."""
    from_file = weights not in ("none", *PRETRAINED)
    if from_file and not looks_like_path(weights):
        raise UserError(f"backbone.weights={weights!r} for backbone.name={PREFIX}{model_name}: allowed are none, "
                        "pretrained (the tag's weights from the Hugging Face cache) or a path to a weights file.")
    model = _create(model_name, pretrained=weights in PRETRAINED)
    notes = load_weights_file(model, weights, f"{PREFIX}{model_name}")[0] if from_file else []
    patch = getattr(model, "patch_embed", None)
    fixed = getattr(patch, "img_size", None) if patch is not None and not getattr(patch, "dynamic_img_size", False) else None
    return Backbone(
        # head_hidden_size: what a headless model outputs when a pre-logits layer follows the trunk (MobileNetV3)
        name=f"{PREFIX}{model_name}", body=model,
        feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
        stages=complete_stages(model, timm_stages(model)), channels=3, min_size=32,
        fixed_size=int(fixed[0]) if fixed else None,
        weights_meta=_meta(model) if weights != "none" else None, notes=notes,
    )


def _family(name: str) -> Any:
    return lambda weights="none": build_timm(name, weights)


BACKBONES.add_family(PREFIX, _family)
