"""Prediction ensembles: several models' class probabilities combined into one prediction per sample
(weight-space fusion, one model out, is models/fusion.py)."""

from __future__ import annotations

import torch

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
