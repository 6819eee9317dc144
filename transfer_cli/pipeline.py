"""Builds the pieces of a run from the config: data, model, loaders, optimizer. Shared by train, source and eval."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from transfer_cli.config import DatasetConfig, HeadConfig
from transfer_cli.data.splits import DataSplits, Transformed
from transfer_cli.data.tasks import make_task
from transfer_cli.data.transforms import InputSpec, resolve_input, sample_transform
from transfer_cli.models.backbone import Classifier
from transfer_cli.registries import BACKBONES, DATASETS, OPTIMIZERS, SCHEDULERS

if TYPE_CHECKING:
    from transfer_cli.methods.base import Method
    from transfer_cli.source import SourceModel


def build_data(cfg: DatasetConfig) -> DataSplits:
    return make_task(DATASETS.get(cfg.name)(cfg), cfg)


def build_model(data_cfg: DatasetConfig, splits: DataSplits, backbone: str, weights: str,
                head: HeadConfig, source: SourceModel | None = None) -> Classifier:
    """The classifier for ``splits``; with ``source``, its body starts from the source-pretrained one."""
    if source is None:
        bb = BACKBONES.get(backbone)(weights=weights, in_channels=splits.channels)
    else:
        bb = BACKBONES.get(backbone)(weights="none", in_channels=source.channels)
        bb.body.load_state_dict(source.body_state)
        bb.weights_meta = source.meta
    spec = resolve_input(data_cfg, splits, bb.channels, bb.min_size, bb.fixed_size, bb.weights_meta)
    return Classifier(bb, len(splits.classes), spec, head.hidden, head.dropout)


def rebuild_model(meta: dict) -> Classifier:
    """The architecture a checkpoint sidecar describes, randomly initialised (its weights are loaded next)."""
    bb = BACKBONES.get(meta["backbone"])(weights="none", in_channels=meta["in_channels"])
    head = meta.get("head", {})
    return Classifier(bb, meta["num_classes"], InputSpec(**meta["input"]), head.get("hidden", ()),
                      head.get("dropout", 0.0))


def make_loader(dataset: Dataset, splits: DataSplits, spec: InputSpec, cfg: DatasetConfig, train: bool,
                device: torch.device, seed: int = 0, batch_size: int | None = None) -> DataLoader:
    transform = sample_transform(spec, splits.size, cfg.augment, train)
    size = batch_size or (cfg.batch_size if train else cfg.eval_batch_size or 2 * cfg.batch_size)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        Transformed(dataset, transform) if transform else dataset,
        batch_size=size,
        shuffle=train,
        drop_last=train and len(dataset) > size,  # a last batch of one breaks BatchNorm statistics
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        generator=generator,
    )


def build_optimization(method: Method, optimizer_cfg: Mapping[str, Any], scheduler_cfg: Mapping[str, Any],
                       batches_per_epoch: int, epochs: int, accumulate: int = 1) -> tuple[Any, Any]:
    """The optimizer over the method's parameter groups and its per-step schedule;
    (None, None) for methods that optimise themselves."""
    if method.manual_optimization:
        return None, None
    plain = OmegaConf.to_container(optimizer_cfg) if OmegaConf.is_config(optimizer_cfg) else dict(optimizer_cfg)
    groups = method.param_groups(plain.get("lr", 1e-3), plain.get("weight_decay", 0.0))
    optimizer = OPTIMIZERS.build(optimizer_cfg, params=groups)
    steps = math.ceil(batches_per_epoch / accumulate)
    scheduler = SCHEDULERS.build(scheduler_cfg, optimizer=optimizer, total_steps=steps * epochs, steps_per_epoch=steps)
    return optimizer, scheduler
