"""Prediction ensembles: several models' class probabilities combined into one prediction per sample
(weight-space fusion, one model out, is models/fusion.py)."""

from __future__ import annotations

import math
from typing import Any

import torch

from transfer_cli.errors import UserError
from transfer_cli.registry import Registry

# name -> fuse(member log-probabilities [M, N, C], weights or None) -> ensemble log-probabilities [N, C]
ENSEMBLES = Registry("ensemble")


@ENSEMBLES.register("mean")
def mean_probability(log_probs: torch.Tensor, weights: list[float] | None = None) -> torch.Tensor:
    """Average of the members' softmax probabilities."""
    return log_probs.exp().mean(0).log()


@ENSEMBLES.register("weighted")
def weighted_probability(log_probs: torch.Tensor, weights: list[float] | None = None) -> torch.Tensor:
    """Weighted average of softmax probabilities; weights are non-negative and normalised to sum 1."""
    w = torch.tensor(weights, dtype=torch.float)
    return (log_probs.exp() * (w / w.sum()).view(-1, 1, 1)).sum(0).log()


@ENSEMBLES.register("vote")
def majority_vote(log_probs: torch.Tensor, weights: list[float] | None = None) -> torch.Tensor:
    """Majority of top-1 predictions; ties go to the higher mean probability."""
    probs = log_probs.exp()
    votes = torch.nn.functional.one_hot(probs.argmax(2), probs.shape[2]).float().mean(0)
    return (votes + 1e-6 * probs.mean(0)).log()


def check_ensemble(cfg: Any, count: int) -> list[float] | None:
    """``cfg``: the ensemble config (name, weights). The member weights as floats, after checking that the fusion rule exists and, for ``weighted``, that
    there is one non-negative weight per member with a positive sum."""
    ENSEMBLES.get(cfg.name)
    weights = None if cfg.weights is None else [float(w) for w in cfg.weights]
    if cfg.name != "weighted" or count < 2:
        return weights
    if weights is None or len(weights) != count:
        raise UserError(f"ensemble=weighted needs ensemble.weights with one weight per checkpoint "
                        f"({count}), got {weights}.")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"ensemble.weights={weights} is not allowed: weights must be finite and >= 0 with a "
                        "positive sum (they are normalised to sum 1).")
    return weights


def check_same_classes(members: list[Any]) -> None:
    """Members (anything with ``path`` and ``recipe``) must predict the same classes in the same order."""
    classes = members[0].recipe.classes
    for m in members[1:]:
        if m.recipe.classes != classes:
            raise UserError(f"checkpoint={m.path!r} predicts classes {m.recipe.classes[:10]}, but "
                            f"{members[0].path!r} predicts {classes[:10]}: ensemble members must share classes "
                            "(same names, same order).")
