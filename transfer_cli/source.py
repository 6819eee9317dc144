"""Source -> target transfer: pretrain the backbone on a source task once, cache it, reuse it.

The cache key is a hash of the source config, the backbone, the source data's identity (its files'
sizes and modification times, where it has files) and the device type and precision it trains with, so a
sweep over target-side settings (method, shots, seed ...) pretrains once and every later run reuses the
model, while changed source data retrains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from transfer_cli.config import HeadConfig
from transfer_cli.data.identity import data_identity
from transfer_cli.data.splits import DataSplits
from transfer_cli.data.transforms import WeightsMeta
from transfer_cli.engine.device import Precision, seed_stage
from transfer_cli.engine.hooks import EvalHook
from transfer_cli.engine.loop import Hook, State, fit
from transfer_cli.files import atomic_write_text
from transfer_cli.methods.base import Method
from transfer_cli.models.backbone import PretrainedBody
from transfer_cli.models.checkpoint import load_model, save_model
from transfer_cli.pipeline import (
    build_image_model,
    build_optimization,
    make_loader,
    prepare_splits,
)
from transfer_cli.reporting.progress import ProgressHook


@dataclass
class SourceModel:
    """A pretrained body to start the target from, and how it was trained."""

    body: PretrainedBody
    history: list[dict[str, Any]]  # per-epoch source metrics, split "source_val"
    path: Path


def source_key(source: DictConfig, backbone: str, data_identity: str, precision: Precision) -> str:
    described = json.dumps({"backbone": backbone, "data": data_identity, "trained_with": [precision.device.type,
                            precision.name], **OmegaConf.to_container(source, resolve=True)}, sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def _pretrain(source: DictConfig, splits: DataSplits, backbone: str, folder: Path, device: torch.device,
              precision: Precision, console: Console, progress: str) -> None:
    seed_stage(source.seed, "source")
    model = build_image_model(source.dataset, splits, backbone, "none", HeadConfig())
    method = Method(model).to(device)  # plain cross-entropy, every layer trains
    splits = prepare_splits(splits, model.spec, source.dataset, lambda message: console.print(message, highlight=False, soft_wrap=True))
    train = make_loader(splits.train, model.spec, source.dataset, True, device, source.seed, persistent=True)
    val = make_loader(splits.val, model.spec, source.dataset, False, device, persistent=True)
    optimizer, scheduler = build_optimization(method, source.optimizer, source.scheduler, len(train), source.epochs)
    console.print(f"pretraining {backbone} on source {source.dataset.name} ({len(splits.train)} train, "
                  f"{len(splits.classes)} classes, {source.epochs} epochs) -> {folder}", highlight=False)
    state = State(method, optimizer, scheduler, source.epochs, len(train))
    try:
        fit(state, train, device, precision, [EvalHook(val, device, precision, "source_val"),
                                              _History(), ProgressHook(console, progress)])
    finally:
        train.close()
        val.close()
    save_model(folder / "model.safetensors", method.model.state_dict(), model.recipe,
               config=OmegaConf.to_container(source, resolve=True))
    atomic_write_text(folder / "history.json", json.dumps(state.history, indent=1))


class _History(Hook):
    """Keeps the source's validation rows for the target run's metrics table."""

    def after_epoch(self, state: State) -> None:
        state.history.append({"epoch": state.epoch + 1, "split": "source_val", **state.epoch_metrics["source_val"]})


def source_model(cfg: DictConfig, splits: DataSplits, device: torch.device, precision: Precision,
                 console: Console) -> SourceModel:
    """The cached source model for ``cfg.source`` (whose data is ``splits``) and ``cfg.backbone.name``,
    pretraining it if needed."""
    folder = Path(cfg.source.cache_dir) / source_key(cfg.source, cfg.backbone.name, data_identity(splits), precision)
    weights = folder / "model.safetensors"
    if not (weights.is_file() and (folder / "history.json").is_file()):
        _pretrain(cfg.source, splits, cfg.backbone.name, folder, device, precision, console, cfg.trainer.progress)
    else:
        console.print(f"source model from cache: {folder}", highlight=False)
    model, _ = load_model(str(weights))
    spec = model.spec
    return SourceModel(
        body=PretrainedBody(state=model.body.state_dict(),
                            meta=WeightsMeta(crop=None, resize=None, mean=spec.mean, std=spec.std),
                            channels=model.recipe.data_channels),
        history=json.loads((folder / "history.json").read_text()),
        path=weights,
    )
