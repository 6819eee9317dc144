"""Source -> target transfer: pretrain the backbone on a source task once, cache it, reuse it.

The cache key is a hash of the source config and the backbone, so a sweep over target-side
settings (method, shots, seed ...) pretrains once and every later run reuses the model.
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
from transfer_cli.data.transforms import WeightsMeta
from transfer_cli.engine.checkpoint import (
    atomic_write_text,
    load_model_state,
    read_checkpoint,
    save_checkpoint,
)
from transfer_cli.engine.device import Precision
from transfer_cli.engine.hooks import EvalHook
from transfer_cli.engine.loop import Hook, State, fit
from transfer_cli.methods.finetune import Finetune
from transfer_cli.pipeline import build_data, build_model, build_optimization, make_loader, rebuild_model
from transfer_cli.reporting.progress import ProgressHook


@dataclass
class SourceModel:
    """A pretrained body to start the target from, and how it was trained."""

    body_state: dict[str, torch.Tensor]
    meta: WeightsMeta  # the source's preprocessing, which the target inherits
    channels: int
    history: list[dict[str, Any]]  # per-epoch source metrics, split "source_val"
    path: Path


def source_key(source: DictConfig, backbone: str) -> str:
    described = json.dumps({"backbone": backbone, **OmegaConf.to_container(source, resolve=True)}, sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def _pretrain(source: DictConfig, backbone: str, folder: Path, device: torch.device, precision: Precision,
              console: Console, progress: str) -> None:
    torch.manual_seed(source.seed)
    splits = build_data(source.dataset)
    model = build_model(source.dataset, splits, backbone, "none", HeadConfig())
    method = Finetune(model).to(device)
    train = make_loader(splits.train, splits, model.spec, source.dataset, True, device, source.seed)
    val = make_loader(splits.val, splits, model.spec, source.dataset, False, device)
    optimizer, scheduler = build_optimization(method, source.optimizer, {"name": "cosine"}, len(train), source.epochs)
    console.print(f"pretraining {backbone} on source {source.dataset.name} ({len(splits.train)} train, "
                  f"{len(splits.classes)} classes, {source.epochs} epochs) -> {folder}", highlight=False)
    state = State(method, optimizer, scheduler, source.epochs, len(train))
    fit(state, train, device, precision, [EvalHook(val, device, precision, "source_val"),
                                          _History(), ProgressHook(console, progress)])
    meta = {"backbone": backbone, "num_classes": len(splits.classes), "classes": splits.classes,
            "in_channels": splits.channels, "input": model.spec.to_dict(), "head": {"hidden": [], "dropout": 0.0},
            "config": OmegaConf.to_container(source, resolve=True)}
    save_checkpoint(folder / "model.safetensors", method.model.state_dict(), meta)
    atomic_write_text(folder / "history.json", json.dumps(state.history, indent=1))


class _History(Hook):
    """Keeps the source's validation rows for the target run's metrics table."""

    def after_epoch(self, state: State) -> None:
        state.history.append({"epoch": state.epoch + 1, "split": "source_val", **state.epoch_metrics["source_val"]})


def source_model(cfg: DictConfig, device: torch.device, precision: Precision, console: Console) -> SourceModel:
    """The cached source model for ``cfg.source`` and ``cfg.backbone.name``, pretraining it if needed."""
    folder = Path(cfg.source.cache_dir) / source_key(cfg.source, cfg.backbone.name)
    weights = folder / "model.safetensors"
    if not (weights.is_file() and (folder / "history.json").is_file()):
        _pretrain(cfg.source, cfg.backbone.name, folder, device, precision, console, cfg.trainer.progress)
    else:
        console.print(f"source model from cache: {folder}", highlight=False)
    state, meta = read_checkpoint(str(weights))
    model = rebuild_model(meta)
    load_model_state(model, state, str(weights))
    spec = model.spec
    return SourceModel(
        body_state=model.body.state_dict(),
        meta=WeightsMeta(crop=None, resize=None, mean=spec.mean, std=spec.std),
        channels=meta["in_channels"],
        history=json.loads((folder / "history.json").read_text()),
        path=weights,
    )
