"""Builds the pieces of a run from the config: data, model, loaders, optimizer. Shared by train, source and eval."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from transfer_cli.config import BackboneConfig, DatasetConfig, HeadConfig
from transfer_cli.data.augment import BatchAugment
from transfer_cli.data.batches import Batches, Rows, resolve_workers
from transfer_cli.data.decoded import DecodedImages, hold_in_memory
from transfer_cli.data.duplicates import flag_duplicates
from transfer_cli.data.splits import DATASETS, DataSplits, Transformed, tensor_view
from transfer_cli.data.tasks import make_task
from transfer_cli.data.tokens import PAD, TextSpec, tokenize_splits, train_texts
from transfer_cli.data.transforms import InputSpec, WeightsMeta, resolve_input, sample_transform
from transfer_cli.engine.distributed import SINGLE, Dist
from transfer_cli.errors import UserError
from transfer_cli.methods.base import Method
from transfer_cli.models.backbone import BACKBONES, Classifier, PretrainedBody, build_backbone, takes_text
from transfer_cli.models.recipe import ModelRecipe
from transfer_cli.models.text_backbones import TextRequest
from transfer_cli.models.weights import weights_sidecar
from transfer_cli.optim import OPTIMIZERS, SCHEDULERS, optimizer_entry


def build_data(cfg: DatasetConfig) -> DataSplits:
    return flag_duplicates(make_task(DATASETS.get(cfg.name)(cfg), cfg), cfg.drop_duplicates)


def _check_kind(splits: DataSplits, data_cfg: DatasetConfig, backbone: str) -> None:
    text = takes_text(backbone)
    if text != splits.text:
        kind = "text" if text else "images"
        fitting = [n for n in BACKBONES.names() if takes_text(n) == splits.text]
        raise UserError(f"backbone={backbone} takes {kind} but dataset={data_cfg.name} holds {splits.kind}. "
                        f"Backbones for {splits.kind}: {', '.join(fitting[:12])}{', ...' if len(fitting) > 12 else ''}.")


def build_text_model(data_cfg: DatasetConfig, splits: DataSplits, backbone: BackboneConfig,
                     head: HeadConfig) -> Classifier:
    """The classifier of a text backbone: its tokenizer settings (a fitted vocabulary, for tfidf) go into
    the recipe, so every checkpoint tokenizes new text exactly as its training data was."""
    if data_cfg.augment != "none":
        raise UserError(f"dataset.augment={data_cfg.augment}: dataset={data_cfg.name} is text, which has no "
                        "augmentation here. Allowed: none.")
    request = TextRequest(path=backbone.path, max_length=backbone.max_length, pool_layers=backbone.pool_layers,
                          tfidf=backbone.tfidf, texts=train_texts(splits))
    bb = BACKBONES.get(backbone.name)(weights=backbone.weights, text=request)
    recipe = ModelRecipe(backbone=backbone.name, weights=backbone.weights, data_channels=0,
                         classes=list(splits.classes), input=None, text=bb.text,
                         head=HeadConfig(hidden=list(head.hidden), dropout=float(head.dropout)))
    return Classifier(bb, recipe)


def build_image_model(data_cfg: DatasetConfig, splits: DataSplits, backbone: str, weights: str,
                head: HeadConfig, pretrained: PretrainedBody | None = None,
                preprocess: Mapping[str, Any] | None = None, in_channels: int | None = None,
                cut: int | None = None) -> Classifier:
    """The classifier of an image backbone for ``splits``; with ``pretrained``, its body starts from those
    weights. ``preprocess`` (backbone.preprocess) overrides the preprocessing the weights bring;
    ``in_channels`` (backbone.in_channels) the number of channels the model takes, else the data's;
    ``cut`` (backbone.cut) the body's stages kept, cut after the weights are in."""
    _check_kind(splits, data_cfg, backbone)
    if pretrained is None:
        data_channels = in_channels or splits.channels
        bb = build_backbone(backbone, weights, data_channels)
        if in_channels and bb.channels != in_channels:
            raise UserError(f"backbone.in_channels={in_channels}: backbone={backbone} has a fixed first layer that "
                            f"takes {bb.channels} channels. Leave backbone.in_channels=null (the model's input "
                            "adapter converts the images), or use a backbone with a free first layer (small_cnn, "
                            "lenet_adda).")
    else:
        if in_channels and in_channels != pretrained.channels:  # the body's first layer is already trained
            raise UserError(f"backbone.in_channels={in_channels}: the source-pretrained body takes "
                            f"{pretrained.channels} channels. Leave backbone.in_channels=null with backbone.weights=source.")
        bb = build_backbone(backbone, "none", pretrained.channels)
        bb.body.load_state_dict(pretrained.state)
        bb.weights_meta = pretrained.meta
        data_channels = pretrained.channels
    for values in (weights_sidecar(weights), preprocess):
        if values and any(v is not None for v in values.values()):
            base = bb.weights_meta or WeightsMeta(crop=None, resize=None, mean=None, std=None)
            bb.weights_meta = base.updated(dict(values))
    spec = resolve_input(data_cfg, splits, bb.channels, bb.min_size, bb.fixed_size, bb.weights_meta)
    if cut is not None:
        bb = bb.cut(cut, spec.size)
    head = HeadConfig(hidden=list(head.hidden), dropout=float(head.dropout))
    recipe = ModelRecipe(backbone=backbone, weights=weights, data_channels=data_channels,
                         classes=list(splits.classes), input=spec, head=head, cut=cut)
    return Classifier(bb, recipe)


def build_model(cfg: Any, splits: DataSplits, pretrained: PretrainedBody | None = None,
                    weights: str | None = None) -> Classifier:
    """The classifier a run config (``cfg.backbone``, ``cfg.head``) describes for ``splits``, text or images;
    ``weights`` replaces ``cfg.backbone.weights``."""
    if splits.text or takes_text(cfg.backbone.name):
        _check_kind(splits, cfg.dataset, cfg.backbone.name)
        if cfg.backbone.cut is not None:
            raise UserError(f"backbone.cut={cfg.backbone.cut}: backbone={cfg.backbone.name} is a text encoder; "
                            "choose its layers with backbone.pool_layers instead (backbone.cut=null).")
        return build_text_model(cfg.dataset, splits, cfg.backbone, cfg.head)
    return build_image_model(cfg.dataset, splits, cfg.backbone.name, weights or cfg.backbone.weights, cfg.head, pretrained,
                             preprocess=cfg.backbone.preprocess, in_channels=cfg.backbone.in_channels,
                             cut=cfg.backbone.cut)


def prepare_splits(splits: DataSplits, spec: InputSpec | TextSpec, cfg: DatasetConfig,
                   log: Callable[[str], None]) -> DataSplits:
    """``splits`` as the model with ``spec`` reads them: texts as token ids, image files decoded in memory
    (when ``dataset.in_memory`` says so)."""
    if isinstance(spec, TextSpec):
        return tokenize_splits(splits, spec, cfg, log)
    return hold_in_memory(splits, spec, cfg, log)


def make_loader(dataset: Dataset, spec: InputSpec | TextSpec, cfg: DatasetConfig, train: bool,
                device: torch.device, seed: int = 0, batch_size: int | None = None, dist: Dist = SINGLE,
                persistent: bool = False) -> Batches:
    """Batches of ``dataset`` as the model takes them: cut from memory (and images augmented on ``device``)
    when the data is an in-memory tensor (see ``prepare_splits``), else decoded and transformed per sample
    (``persistent``: by workers that stay between epochs until ``Batches.close``)."""
    size = batch_size or (cfg.batch_size if train else cfg.eval_batch_size or 2 * cfg.batch_size)
    drop_last = train and len(dataset) > size  # a last batch of one breaks BatchNorm statistics
    augment = cfg.augment if train else "none"
    view = tensor_view(dataset)
    if isinstance(spec, TextSpec) and view is None:
        raise ValueError("text batches need token ids: call prepare_splits first")
    if view is not None:
        base, rows, labels = view
        if isinstance(spec, TextSpec):
            lengths = (base.tensor[rows] != PAD).sum(1) if train and cfg.group_by_length else None
            return Batches(Rows(base.tensor, rows, labels), size, train, drop_last, seed, device, lengths=lengths,
                           dist=dist)
        return Batches(Rows(base.tensor, rows, labels), size, train, drop_last, seed, device,
                       BatchAugment(augment, spec.size, decoded=isinstance(base, DecodedImages)), dist=dist)
    return Batches(Transformed(dataset, sample_transform(spec, augment)), size, train, drop_last, seed, device,
                   workers=resolve_workers(cfg.num_workers), dist=dist, persistent=persistent)


def sample_loader(dataset: Dataset, spec: InputSpec, cfg: DatasetConfig, device: torch.device, samples: int,
                  seed: int = 0) -> Batches:
    """Unaugmented batches of at most ``samples`` items of ``dataset``, drawn without replacement with ``seed``."""
    if len(dataset) > samples:
        picked = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:samples]
        dataset = Subset(dataset, picked.sort().values.tolist())
    return make_loader(dataset, spec, cfg, False, device, seed)


def build_optimizer(method: Method, entry: Mapping[str, Any], lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer ``entry`` (see optim.optimizer_entry) over the method's parameter groups, at ``lr`` when
    given (the learning-rate range test sweeps it) else at the entry's."""
    lr = entry["lr"] if lr is None else lr
    groups = method.param_groups(lr, entry.get("weight_decay", 0.0))
    return OPTIMIZERS.build({**entry, "lr": lr}, params=groups)


def build_optimization(method: Method, optimizer_cfg: Mapping[str, Any], scheduler_cfg: Mapping[str, Any],
                       batches_per_epoch: int, epochs: int, accumulate: int = 1, processes: int = 1) -> tuple[Any, Any]:
    """The optimizer over the method's parameter groups and its per-step schedule;
    (None, None) for methods that optimise themselves."""
    if method.manual_optimization:
        return None, None
    optimizer = build_optimizer(method, optimizer_entry(optimizer_cfg, processes))
    steps = math.ceil(batches_per_epoch / accumulate)
    scheduler = SCHEDULERS.build(scheduler_cfg, optimizer=optimizer, total_steps=steps * epochs, steps_per_epoch=steps)
    return optimizer, scheduler
