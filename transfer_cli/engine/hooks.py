"""Hooks the train command attaches to the loop: validation and checkpoints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from transfer_cli.engine.device import Precision
from transfer_cli.engine.loop import Hook, State, evaluate

# (path, weights, facts about the epoch they come from) -> writes one checkpoint
SaveWeights = Callable[[Path, dict[str, torch.Tensor], dict[str, Any]], None]


# State -> a context in which the method's model holds the weights to evaluate and checkpoint
# (e.g. the averaged weights of EMA or SWA); nullcontext when they are the weights training.
Weights = Callable[[State], AbstractContextManager]


def training_weights(state: State) -> AbstractContextManager:
    return nullcontext()


class EvalHook(Hook):
    """Evaluates a held-out split after every epoch, with the weights ``weights`` puts in place."""

    def __init__(self, loader: Iterable, device: torch.device, precision: Precision, split: str = "val",
                 weights: Weights = training_weights) -> None:
        self.loader, self.device, self.precision, self.split = loader, device, precision, split
        self.weights = weights

    def after_epoch(self, state: State) -> None:
        with self.weights(state):
            state.epoch_metrics[self.split] = evaluate(state.method, self.loader, self.device, self.precision)


class Checkpointer(Hook):
    """Keeps the best weights (by ``metric`` on ``split``, higher or lower being better as ``higher`` says;
    without that split, the latest epoch) among the epochs from ``first_epoch`` (0-based) on, in memory
    and writes last.safetensors and best.safetensors after the first epoch, then whenever ``save_every_s``
    seconds have passed since the previous write, and at the end. Short epochs thus do not pay for a disk
    write each, and a killed run loses at most ``save_every_s`` seconds of training. ``after_write`` runs
    after each write (the resumable training state is saved there, consistent with the weights)."""

    def __init__(self, folder: Path, save: SaveWeights, describe: Callable[[State], dict[str, Any]],
                 split: str = "val", metric: str = "acc1", save_every_s: float = 60.0,
                 after_write: Callable[[State], None] | None = None, weights: Weights = training_weights,
                 higher: bool = True, first_epoch: int = 0, agree: Callable[[bool], bool] = bool) -> None:
        self.folder, self.save, self.describe, self.weights = folder, save, describe, weights
        self.split, self.metric, self.save_every_s = split, metric, save_every_s
        self.higher, self.first_epoch = higher, first_epoch
        self.after_write = after_write
        self.agree = agree  # several processes: process 0's decision to write, so all take part in the write
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_facts: dict[str, Any] = {}
        self.best_written = True
        self.last_write = -math.inf

    def after_epoch(self, state: State) -> None:
        monitored = self.split in state.epoch_metrics
        value = state.epoch_metrics[self.split][self.metric] if monitored else float(state.epoch + 1)
        better = not state.best or not monitored or (
            value > state.best["value"] if self.higher else value < state.best["value"])
        if state.epoch >= self.first_epoch and better:
            state.best = {"epoch": state.epoch + 1, "split": self.split if monitored else "last",
                          "metric": self.metric if monitored else "epoch", "value": value}
            self.best_state = self.checkpoint_weights(state)
            self.best_facts, self.best_written = self.describe(state), False
        if self.agree(time.monotonic() - self.last_write >= self.save_every_s):
            self.write(state)

    def after_fit(self, state: State) -> None:
        self.write(state)

    def checkpoint_weights(self, state: State) -> dict[str, torch.Tensor]:
        """CPU copies of what a checkpoint holds: the plain Classifier's weights (see Method.plain_state)."""
        with self.weights(state):
            return state.method.plain_state()

    def write(self, state: State) -> None:
        if not self.best_written:
            self.save(self.folder / "best.safetensors", self.best_state, self.best_facts)
            self.best_written = True
        self.save(self.folder / "last.safetensors", self.checkpoint_weights(state), self.describe(state))
        if self.after_write:
            self.after_write(state)
        self.last_write = time.monotonic()
