"""A backbone (body + feature size + stage split) and the classifier built on it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from transfer_cli.data.tokens import TextSpec
from transfer_cli.data.transforms import WeightsMeta
from transfer_cli.errors import UserError
from transfer_cli.models.cut import cut_body
from transfer_cli.models.input import InputAdapter
from transfer_cli.models.recipe import ModelRecipe
from transfer_cli.models.stages import Stage, complete_stages, describe_stage, in_stage
from transfer_cli.models.weights import last_linear, load_weights_file
from transfer_cli.registry import Registry


@dataclass
class Backbone:
    name: str
    body: nn.Module  # images -> features [N, feature_dim]
    feature_dim: int
    stages: list[Stage]  # stem first, head excluded
    channels: int  # input channels the first layer takes (0: a text backbone)
    min_size: int = 8
    fixed_size: int | None = None  # some architectures take exactly one input size (ViT: 224)
    weights_meta: WeightsMeta | None = None
    notes: list[str] = field(default_factory=list)  # what loading the weights reported, for the run log
    text: TextSpec | None = None  # text backbones: how texts become the token ids the body takes
    source_head: nn.Module | None = None  # the classifier the network came with (its source task's classes)

    def cut(self, stages: int, probe_size: int) -> Backbone:
        """This backbone with only its first ``stages`` stages (backbone.cut; models/cut.py); ``probe_size``
        is an input size the body takes."""
        body, width, kept = cut_body(self.name, self.body, self.stages, self.channels, stages, probe_size)
        note = f"cut after stage {stages} of {len(self.stages)} ({describe_stage(self.stages[stages - 1])}): {width} features"
        # the source classifier read the whole body's features: a cut has none (LEEP and NCE score NaN)
        return replace(self, body=body, feature_dim=width, stages=kept, source_head=None, notes=[*self.notes, note])


# name -> builder(weights: str[, in_channels: int]) -> Backbone. Builders of architectures whose first
# layer can take any number of channels accept ``in_channels`` (the data's channels); the others have
# a fixed stem and the model's InputAdapter converts the data to it. Text backbones take ``text``
# (models/text_backbones.py) instead.
BACKBONES = Registry("backbone")


def takes_text(name: str) -> bool:
    return "text" in inspect.signature(BACKBONES.get(name)).parameters


def build_backbone(name: str, weights: str, data_channels: int) -> Backbone:
    """The registered image backbone ``name``; builders with a free first layer get the data's channels."""
    builder = BACKBONES.get(name)
    if "in_channels" in inspect.signature(builder).parameters:
        return builder(weights=weights, in_channels=data_channels)
    return builder(weights=weights)


@dataclass
class PretrainedBody:
    """Body weights to start from instead of the backbone's own (e.g. a source-pretrained model)."""

    state: dict[str, torch.Tensor]
    meta: WeightsMeta  # the preprocessing those weights were trained with
    channels: int


def detach_head(name: str, model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """Replace the model's last Linear layer (its classifier) with Identity; return (body, that layer)."""
    found = last_linear(model)
    if found is None:
        raise UserError(f"backbone={name} has no linear classifier layer to replace, so it cannot be used here.")
    path, last = found
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.Identity())
    return model, last


def backbone_from_classifier(name: str, model: nn.Module, weights: str,
                             stages: list[Stage] | Callable[[nn.Module], list[Stage]], channels: int,
                             **extra: Any) -> Backbone:
    """The one way a classification network becomes a Backbone: load ``weights`` (a local file; "none"
    keeps what the model holds), replace the classifier by Identity, record the stage split (a list,
    or a function of the body)."""
    notes, loaded = load_weights_file(model, weights, name) if weights != "none" else ([], None)
    classifier_path = (last_linear(model) or ("", None))[0]
    body, classifier = detach_head(name, model)
    split = stages(body) if callable(stages) else stages
    # The classifier is a source task's only if the file held it (a body-only file leaves it random).
    from_source = loaded is None or {f"{classifier_path}.weight", f"{classifier_path}.bias"} <= loaded
    return Backbone(name=name, body=body, feature_dim=classifier.in_features, stages=complete_stages(body, split),
                    channels=channels, notes=notes, source_head=classifier if from_source else None, **extra)


def make_head(feature_dim: int, num_classes: int, hidden: list[int] = (), dropout: float = 0.0) -> nn.Sequential:
    """Linear head, or an MLP with ReLU between ``hidden`` layers; dropout before every linear layer."""
    layers: list[nn.Module] = []
    widths = [feature_dim, *hidden, num_classes]
    for i, (width_in, width_out) in enumerate(zip(widths, widths[1:], strict=False)):
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width_in, width_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    """InputAdapter -> backbone body -> head. What every method trains and every checkpoint holds;
    ``recipe`` says how to build it again (written beside every checkpoint)."""

    def __init__(self, backbone: Backbone, recipe: ModelRecipe) -> None:
        super().__init__()
        self.recipe = recipe
        self.backbone_name = backbone.name
        self.notes = backbone.notes  # what loading the weights reported
        self.stages = backbone.stages
        self.spec = recipe.text or recipe.input  # how raw samples become what ``input`` takes
        self.input = InputAdapter(recipe.input) if recipe.input else nn.Identity()
        self.body = backbone.body
        self.feature_dim = backbone.feature_dim
        self.head = make_head(backbone.feature_dim, len(recipe.classes), list(recipe.head.hidden), recipe.head.dropout)
        # The classifier the network came with, held in a tuple so that it stays out of the module tree (no
        # checkpoint carries it): transfer rank reads source-class probabilities from it (LEEP, NCE).
        self.source_head: tuple[nn.Module, ...] = (backbone.source_head,) if backbone.source_head is not None else ()

    @classmethod
    def from_recipe(cls, recipe: ModelRecipe) -> Classifier:
        """The architecture ``recipe`` describes, randomly initialised; the caller loads its weights."""
        if recipe.text is not None:
            return cls(BACKBONES.get(recipe.backbone)(weights="none", text=recipe.text), recipe)
        backbone = build_backbone(recipe.backbone, "none", recipe.data_channels)
        return cls(backbone.cut(recipe.cut, recipe.input.size) if recipe.cut else backbone, recipe)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def head_weight_sq_norm(self) -> torch.Tensor:
        """Sum of squared head weights (biases excluded): the L2 term of probes and L2-SP."""
        return sum((p**2).sum() for n, p in self.head.named_parameters() if n.endswith("weight"))

    def stage_parameters(self, index: int) -> list[nn.Parameter]:
        stage = self.stages[index]
        return [p for n, p in self.body.named_parameters() if in_stage(n, stage)]

    def stage_modules(self, index: int) -> list[nn.Module]:
        stage = self.stages[index]
        return [m for n, m in self.body.named_modules() if n and in_stage(n, stage)]
