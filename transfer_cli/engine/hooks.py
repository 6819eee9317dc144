"""Hooks the train command attaches to the loop: validation and checkpoints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from transfer_cli.engine.device import Precision
from transfer_cli.engine.loop import Hook, State, evaluate
from transfer_cli.engine.selection import LAST, VALIDATORS, Selection
from transfer_cli.run_folder import RunFolder

VAL_ACC1 = VALIDATORS["val_acc1"]

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
    """Keeps the best weights (by ``selection``; without its split, the latest epoch) among the epochs from
    ``first_epoch`` (0-based) on, in memory, and writes the run folder's last and best checkpoints after the
    first epoch, then whenever ``save_every_s`` seconds have passed since the previous write, and at the end.
    Short epochs thus do not pay for a disk write each, and a killed run loses at most ``save_every_s``
    seconds of training. ``after_write`` runs after each write (the resumable training state is saved there,
    consistent with the weights)."""

    def __init__(self, folder: RunFolder, save: SaveWeights, describe: Callable[[State], dict[str, Any]],
                 selection: Selection = VAL_ACC1, *, save_every_s: float = 60.0,
                 after_write: Callable[[State], None] | None = None, weights: Weights = training_weights,
                 first_epoch: int = 0, agree: Callable[[bool], bool] = bool) -> None:
        self.folder, self.save, self.describe, self.weights = folder, save, describe, weights
        self.selection, self.save_every_s, self.first_epoch = selection, save_every_s, first_epoch
        self.after_write = after_write
        self.agree = agree  # several processes: process 0's decision to write, so all take part in the write
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_facts: dict[str, Any] = {}
        self.best_written = True
        self.last_write = -math.inf

    def state_dict(self) -> dict[str, Any]:
        return {"has_best": self.best_state is not None}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """The best weights so far are the best checkpoint written with this state (none yet when the run
        stopped before its first selectable epoch, e.g. in SHOT's source phase)."""
        if saved["has_best"]:
            self.best_state = load_file(str(self.folder.best))

    def after_epoch(self, state: State) -> None:
        rule = self.selection if self.selection.split in state.epoch_metrics else LAST
        value = state.epoch_metrics[rule.split][rule.metric] if rule is not LAST else float(state.epoch + 1)
        better = not state.best or rule is LAST or rule.better(value, state.best["value"])
        if state.epoch >= self.first_epoch and better:
            state.best = {"epoch": state.epoch + 1, "split": rule.split, "metric": rule.metric, "value": value}
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
            self.save(self.folder.best, self.best_state, self.best_facts)
            self.best_written = True
        self.save(self.folder.last, self.checkpoint_weights(state), self.describe(state))
        if self.after_write:
            self.after_write(state)
        self.last_write = time.monotonic()
