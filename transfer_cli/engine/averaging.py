"""Weight averaging during training: an exponential moving average (EMA) updated every optimizer step,
or stochastic weight averaging (SWA, Izmailov et al. 2018) of the weights at the end of every epoch from
``swa_start`` on. Both keep the average in torch's ``swa_utils.AveragedModel``; the training weights
stay untouched, and the average is swapped into the model only while it is evaluated and checkpointed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from transfer_cli.engine.device import Precision, to_device
from transfer_cli.engine.loop import Hook, State

_NORMS = nn.modules.batchnorm._BatchNorm


class WeightAverage(Hook):
    """EMA (``ema_decay`` in (0, 1)) or SWA (``swa_start``: the first 1-based epoch averaged) of
    ``state.method.model``. The EMA decay warms up as min(decay, (1 + k) / (10 + k)) after k updates, so
    short runs do not stay near their random start. Buffers are averaged too; with SWA, BatchNorm
    statistics that train are then recomputed on ``bn_loader`` for the averaged weights (they are not an
    average of the running statistics), each epoch the average changes."""

    def __init__(self, model: nn.Module, ema_decay: float | None, swa_start: int | None,
                 bn_loader: Iterable | None, device: torch.device, precision: Precision,
                 fixed_norms: Iterable[nn.Module] = ()) -> None:
        self.ema_decay, self.swa_start = ema_decay, swa_start
        self.bn_loader, self.device, self.precision = bn_loader, device, precision
        fixed = {id(m) for m in fixed_norms}
        self.trained_norms = [name for name, m in model.named_modules() if isinstance(m, _NORMS) and id(m) not in fixed]
        self.updates = 0  # host-side count, so the EMA weight needs no device sync
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.last_step = 0

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _: torch.Tensor) -> None:
        k = self.updates
        keep = min(self.ema_decay, (1 + k) / (10 + k)) if self.ema_decay else k / (k + 1)
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - keep)
        else:  # integer buffers (BatchNorm's batch counter) follow the model
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)
        self.updates += 1

    def after_step(self, state: State) -> None:
        if self.ema_decay and state.step > self.last_step:  # an optimizer step happened (not only accumulation)
            self.update(state.method.model)
        self.last_step = state.step

    def after_epoch(self, state: State) -> None:
        if self.swa_start is not None and state.epoch + 1 >= self.swa_start:
            self.update(state.method.model)
            if self.trained_norms and self.bn_loader is not None:
                recompute_norm_statistics(self.averaged.module, self.bn_loader, self.device, self.precision,
                                          self.trained_norms)

    def active(self) -> bool:
        return self.updates > 0

    @contextmanager
    def applied(self, state: State) -> Iterator[None]:
        """The averaged weights in ``state.method.model`` for the duration; the training weights after.
        Before the first update (SWA before ``swa_start``) the training weights are what is evaluated."""
        if not self.active():
            yield
            return
        model = state.method.model
        live = [t.detach().clone() for t in _tensors(model)]
        with torch.no_grad():
            for target, value in zip(_tensors(model), _tensors(self.averaged.module), strict=True):
                target.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for target, value in zip(_tensors(model), live, strict=True):
                    target.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": self.averaged.state_dict(), "updates": self.updates, "last_step": self.last_step}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.averaged.load_state_dict(saved["averaged"])
        self.updates, self.last_step = saved["updates"], saved["last_step"]

    def describe(self) -> dict[str, Any]:
        kind = {"ema_decay": self.ema_decay} if self.ema_decay else {"swa_start": self.swa_start}
        return {"weight_average": {**kind, "updates": self.updates}}


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


@torch.no_grad()
def recompute_norm_statistics(model: nn.Module, loader: Iterable, device: torch.device, precision: Precision,
                              names: Iterable[str] | None = None) -> None:
    """BatchNorm running statistics of ``model`` measured anew as the exact mean over every batch of
    ``loader`` (the weights of an average are not the weights the old statistics were measured with).
    ``names``: only these BatchNorm modules (None: all); every other module stays in eval mode, so fixed
    statistics (folded BatchNorm) and dropout are untouched. ``loader`` yields (inputs, labels)."""
    chosen = set(names) if names is not None else None
    norms = [m for name, m in model.named_modules()
             if isinstance(m, _NORMS) and (chosen is None or name in chosen) and m.track_running_stats]
    if not norms:
        return
    was_training = model.training
    model.eval()
    momenta = []
    for m in norms:
        m.reset_running_stats()
        momenta.append(m.momentum)
        m.momentum = None  # cumulative average over the batches
        m.train()
    for x, _ in loader:
        with precision.autocast():
            model(to_device(x, device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)
