"""Label-free validators: how good a model looks on unlabelled target data, computed every epoch so a
domain-adaptation run can pick its checkpoint without target labels (Saito et al. 2021, "Tune it the right
way"). Higher is better for each of them except ``entropy``.

- ``entropy``: mean prediction entropy (lower: more confident).
- ``im``: information maximisation, H(mean prediction) - mean H(prediction): confident *and* diverse.
- ``snd``: soft neighbourhood density, the mean entropy of each sample's softmax similarity to the others
  (temperature 0.05, on L2-normalised class probabilities): high when samples form dense clusters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from transfer_cli.engine.device import Precision
from transfer_cli.engine.hooks import Weights, training_weights
from transfer_cli.engine.loop import Hook, State, infer
from transfer_cli.engine.selection import VALIDATORS

SND_SAMPLES = 4096  # SND compares every pair: a fixed (first-N, unshuffled) subset keeps it O(N^2) small
SND_TEMPERATURE = 0.05


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of class probabilities."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(1)


def information_maximization(probs: torch.Tensor) -> torch.Tensor:
    """H(mean prediction) - mean H(prediction); the negative of SHOT's IM loss."""
    return entropy(probs.mean(0, keepdim=True))[0] - entropy(probs).mean()


def soft_neighborhood_density(probs: torch.Tensor, temperature: float = SND_TEMPERATURE) -> torch.Tensor:
    """Mean entropy of each sample's softmax over its cosine similarities to every other sample."""
    unit = torch.nn.functional.normalize(probs.float(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-torch.inf)  # a sample is not its own neighbour
    return entropy((similarity / temperature).softmax(1)).mean()


def validator_scores(logits: torch.Tensor) -> dict[str, float]:
    probs = logits.float().softmax(1)
    return {"entropy": entropy(probs).mean().item(), "im": information_maximization(probs).item(),
            "snd": soft_neighborhood_density(probs[:SND_SAMPLES]).item()}


class TargetValidators(Hook):
    """After every epoch: the label-free validators on the target's train images (unaugmented, in a fixed
    order; their labels are never read), as the ``target_train`` row of the epoch."""

    def __init__(self, loader: Iterable, device: torch.device, precision: Precision,
                 weights: Weights = training_weights) -> None:
        self.loader, self.device, self.precision, self.weights = loader, device, precision, weights

    def after_epoch(self, state: State) -> None:
        state.method.eval()
        with self.weights(state):
            logits, _labels = infer(state.method.predict, self.loader, self.device, self.precision)  # labels unread
        state.epoch_metrics["target_train"] = validator_scores(logits)


def validator_picks(history: list[dict[str, Any]], first_epoch: int = 1) -> list[dict[str, Any]]:
    """For each validator, then the last epoch, the epoch it chooses among epochs >= ``first_epoch`` (1-based)
    and the target test accuracy of that epoch's weights; last, the oracle: the epoch of best target test
    accuracy, which needs target labels and is there for reference only. Ties go to the earlier epoch, as
    the Checkpointer keeps the first of equal scores."""
    rows = {(r["epoch"], r["split"]): r for r in history}
    epochs = sorted(e for e, split in rows if split == "target_test" and e >= first_epoch)
    picks = []
    for name, rule in VALIDATORS.items():
        split, metric = rule.split, rule.metric
        scored = [(rows[(e, split)][metric], e) for e in epochs
                  if isinstance(rows.get((e, split), {}).get(metric), float) and math.isfinite(rows[(e, split)][metric])]
        if scored:
            sign = 1 if rule.higher else -1
            score, epoch = max(scored, key=lambda pair: (sign * pair[0], -pair[1]))
            picks.append({"validator": name, "epoch": epoch, "score": score,
                          "target_test_acc1": rows[(epoch, "target_test")]["acc1"]})
    if epochs:
        last = epochs[-1]
        oracle = max(epochs, key=lambda e: (rows[(e, "target_test")]["acc1"], -e))
        picks.append({"validator": "last", "epoch": last, "score": float(last),
                      "target_test_acc1": rows[(last, "target_test")]["acc1"]})
        picks.append({"validator": "oracle (target labels)", "epoch": oracle,
                      "score": rows[(oracle, "target_test")]["acc1"],
                      "target_test_acc1": rows[(oracle, "target_test")]["acc1"]})
    return picks
