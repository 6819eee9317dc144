"""Hooks the train command attaches to the loop: validation, the metrics table, checkpoints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from transfer_cli.engine.checkpoint import save_checkpoint
from transfer_cli.engine.device import Precision
from transfer_cli.engine.loop import Hook, State, evaluate
from transfer_cli.reporting.tables import write_table

METRIC_COLUMNS = ["epoch", "split", "loss", "acc1", "acc5", "lr", "seconds", "samples_per_s"]


class EvalHook(Hook):
    """Evaluates a held-out split after every epoch."""

    def __init__(self, loader: DataLoader, device: torch.device, precision: Precision, split: str = "val") -> None:
        self.loader, self.device, self.precision, self.split = loader, device, precision, split

    def after_epoch(self, state: State) -> None:
        state.epoch_metrics[self.split] = evaluate(state.method, self.loader, self.device, self.precision)


def metrics_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(history)
    known = [c for c in METRIC_COLUMNS if c in df.columns]
    return df[known + sorted(c for c in df.columns if c not in METRIC_COLUMNS)]


class MetricsWriter(Hook):
    """Adds one row per split to the history and rewrites metrics.csv, so it is current after every epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def after_epoch(self, state: State) -> None:
        for split, metrics in state.epoch_metrics.items():
            state.history.append({"epoch": state.epoch + 1, "split": split, **metrics})
        write_table(metrics_frame(state.history), self.path, markdown=False)


class Checkpointer(Hook):
    """Keeps the best weights (by the monitored validation metric) in memory and writes
    last.safetensors and best.safetensors after the first epoch, then whenever ``save_every_s``
    seconds have passed since the previous write, and at the end. Short epochs thus do not pay
    for a disk write each, and a killed run loses at most ``save_every_s`` seconds of training."""

    def __init__(self, folder: Path, meta: Callable[[State], dict[str, Any]], split: str = "val",
                 metric: str = "acc1", save_every_s: float = 60.0) -> None:
        self.folder, self.meta, self.split, self.metric = folder, meta, split, metric
        self.save_every_s = save_every_s
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_meta: dict[str, Any] = {}
        self.best_written = True
        self.last_write = -math.inf

    def after_epoch(self, state: State) -> None:
        value = state.epoch_metrics[self.split][self.metric]
        if not state.best or value > state.best["value"]:
            state.best = {"epoch": state.epoch + 1, "split": self.split, "metric": self.metric, "value": value}
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.method.model.state_dict().items()}
            self.best_meta, self.best_written = self.meta(state), False
        if time.monotonic() - self.last_write >= self.save_every_s:
            self.write(state)

    def after_fit(self, state: State) -> None:
        self.write(state)

    def write(self, state: State) -> None:
        save_checkpoint(self.folder / "last.safetensors", state.method.model.state_dict(), self.meta(state))
        if not self.best_written:
            save_checkpoint(self.folder / "best.safetensors", self.best_state, self.best_meta)
            self.best_written = True
        self.last_write = time.monotonic()
