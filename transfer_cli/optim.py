"""Optimizers and learning-rate schedules (registered in OPTIMIZERS and SCHEDULERS).

Config keys are keyword-only and required: their defaults live in the entry's YAML (conf/optimizer/,
conf/scheduler/) and nowhere else.

Every schedule steps once per optimizer step, so warmup and decay are smooth whatever the epoch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from omegaconf import OmegaConf
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from transfer_cli.errors import UserError
from transfer_cli.registry import Fraction, NonNegative, Positive, Range, Registry

# name -> builder(params, **cfg) -> Optimizer
OPTIMIZERS = Registry("optimizer")
# name -> builder(optimizer, total_steps, steps_per_epoch, **cfg) -> a per-step LR schedule
SCHEDULERS = Registry("scheduler")

Params = list[dict[str, Any]]


@OPTIMIZERS.register("sgd")
def sgd(params: Params, *, lr: Positive, momentum: Fraction, weight_decay: NonNegative, nesterov: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


@OPTIMIZERS.register("adam")
def adam(params: Params, *, lr: Positive, betas: list[Fraction], eps: Positive, weight_decay: NonNegative) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(params: Params, *, lr: Positive, betas: list[Fraction], eps: Positive, weight_decay: NonNegative) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("adagrad")
def adagrad(params: Params, *, lr: Positive, lr_decay: NonNegative, weight_decay: NonNegative, eps: Positive) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps)


@OPTIMIZERS.register("rmsprop")
def rmsprop(params: Params, *, lr: Positive, alpha: Fraction, momentum: Fraction, weight_decay: NonNegative,
            eps: Positive) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=lr, alpha=alpha, momentum=momentum, weight_decay=weight_decay, eps=eps)


def _with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, after: Callable[[int], float]) -> LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return after(step - warmup_steps)

    return LambdaLR(optimizer, factor)


@SCHEDULERS.register("none")
def constant(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int, *,
             warmup_epochs: NonNegative) -> LRScheduler:
    return _with_warmup(optimizer, round(warmup_epochs * steps_per_epoch), lambda _: 1.0)


@SCHEDULERS.register("cosine")
def cosine(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int, *,
           warmup_epochs: NonNegative, min_lr_ratio: Annotated[float, Range(ge=0, le=1)]) -> LRScheduler:
    warmup = round(warmup_epochs * steps_per_epoch)
    decay_steps = max(1, total_steps - warmup)

    def after(step: int) -> float:
        progress = min(1.0, step / decay_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return _with_warmup(optimizer, warmup, after)


@SCHEDULERS.register("step")
def step(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int, *,
         step_epochs: Positive, gamma: Positive, warmup_epochs: NonNegative) -> LRScheduler:
    warmup = round(warmup_epochs * steps_per_epoch)
    every = max(1, round(step_epochs * steps_per_epoch))
    return _with_warmup(optimizer, warmup, lambda s: gamma ** (s // every))


@SCHEDULERS.register("dann")
def dann_annealing(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int, *,
                   alpha: NonNegative, beta: NonNegative) -> LRScheduler:
    """mu_p = mu_0 / (1 + alpha p)^beta with p the training progress (Ganin & Lempitsky 2015)."""
    return LambdaLR(optimizer, lambda step: (1 + alpha * min(1.0, step / max(total_steps, 1))) ** -beta)


@SCHEDULERS.register("onecycle")
def onecycle(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int, *,
             pct_start: Annotated[float, Range(gt=0, lt=1)], div_factor: Positive,
             final_div_factor: Positive) -> LRScheduler:
    # The configured learning rate is the peak; OneCycle warms up to it and anneals below it.
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(total_steps, 1), pct_start=pct_start,
                      div_factor=div_factor, final_div_factor=final_div_factor)


def add_param_groups(optimizer: torch.optim.Optimizer, scheduler: LRScheduler, groups: Params) -> None:
    """Add parameter groups mid-training and put them on the same schedule as the existing ones."""
    for group in groups:
        base = group["lr"]
        optimizer.add_param_group(group)
        if isinstance(scheduler, LambdaLR):
            factor = scheduler.lr_lambdas[0]
            scheduler.base_lrs.append(base)
            scheduler.lr_lambdas.append(factor)
            group["initial_lr"] = base
            group["lr"] = base * factor(scheduler.last_epoch)
        elif isinstance(scheduler, OneCycleLR):
            first = optimizer.param_groups[0]
            ratio = base / first["max_lr"]
            for key in ("initial_lr", "max_lr", "min_lr", "lr"):
                group[key] = first[key] * ratio
            for key in ("max_momentum", "base_momentum"):
                if key in first:
                    group[key] = first[key]


SCALE_LR = ("none", "linear")


AUTO_LR = "auto"  # optimizer.lr=auto: found by the learning-rate range test (engine/lr_find.py)


def optimizer_entry(optimizer_cfg: Mapping[str, Any], processes: int = 1) -> dict[str, Any]:
    """The optimizer's registry entry: ``scale_lr`` (the CLI's own key) applied and removed. linear: the
    learning rate times the number of processes, whose batches add up to the global batch (Goyal et al. 2017)."""
    plain = OmegaConf.to_container(optimizer_cfg) if OmegaConf.is_config(optimizer_cfg) else dict(optimizer_cfg)
    scale = plain.pop("scale_lr", "none")
    if scale not in SCALE_LR:
        raise UserError(f"optimizer.scale_lr={scale!r} is not allowed. Allowed: none, or linear (lr x processes).")
    if scale == "linear" and plain.get("lr") != AUTO_LR:  # a found rate is scaled once it is known
        plain["lr"] = plain["lr"] * processes
    return plain
