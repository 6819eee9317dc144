"""Weight-space fusion of checkpoints of one architecture: WiSE-FT interpolation (Wortsman et al. 2022,
"Robust fine-tuning of zero-shot models"), uniform and greedy model soups (Wortsman et al. 2022, "Model
soups"). One model comes out, so inference costs what one member costs (unlike a prediction ensemble).

Each rule gets the members' weights, their labels and ``score``: weights -> metrics of the fused model,
with ``val_acc1`` (validation accuracy) among them, the only number a rule may choose by. It returns
every candidate it scored and the index of the one it chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from transfer_cli.registry import Registry

State = dict[str, torch.Tensor]
Score = Callable[[State], dict[str, float]]

# name -> rule(states, labels, score, alphas) -> Fused
WEIGHT_FUSIONS = Registry("fusion")


@dataclass
class Candidate:
    label: str
    state: State
    metrics: dict[str, float]
    facts: dict[str, Any] = field(default_factory=dict)  # alpha, members, added ... for the table


@dataclass
class Fused:
    candidates: list[Candidate]
    chosen: int  # index into candidates: what the rule reports as its result


def weighted_average(states: list[State], weights: list[float]) -> State:
    """sum_i w_i * state_i for floating tensors; integer buffers (BatchNorm's batch counter) from the first."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = sum(w * s[key].float() for w, s in zip(weights, states, strict=True)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def _best(candidates: list[Candidate]) -> int:
    """The highest validation accuracy; the first such (wise: the smallest alpha)."""
    scores = [c.metrics["val_acc1"] for c in candidates]
    return scores.index(max(scores))


@WEIGHT_FUSIONS.register("wise")
def wise(states: list[State], labels: list[str], score: Score, alphas: list[float]) -> Fused:
    """(1 - alpha) * A + alpha * B for each alpha: A is the first checkpoint (e.g. the linear probe or the
    zero-shot model), B the second (fine-tuned); alpha 0 is A, alpha 1 is B. Chooses the alpha with the
    best validation accuracy."""
    candidates = []
    for alpha in alphas:
        state = weighted_average(states, [1.0 - alpha, alpha])
        candidates.append(Candidate(f"wise alpha={alpha:g}", state, score(state), {"alpha": alpha}))
    return Fused(candidates, _best(candidates))


def _members(states: list[State], labels: list[str], score: Score) -> list[Candidate]:
    return [Candidate(label, state, score(state), {"members": 1}) for state, label in zip(states, labels, strict=True)]


@WEIGHT_FUSIONS.register("soup")
def uniform_soup(states: list[State], labels: list[str], score: Score, alphas: list[float]) -> Fused:
    """Every member, then their plain average."""
    candidates = _members(states, labels, score)
    state = weighted_average(states, [1.0 / len(states)] * len(states))
    candidates.append(Candidate(f"uniform soup of {len(states)}", state, score(state), {"members": len(states)}))
    return Fused(candidates, len(candidates) - 1)


@WEIGHT_FUSIONS.register("greedy_soup")
def greedy_soup(states: list[State], labels: list[str], score: Score, alphas: list[float]) -> Fused:
    """Members sorted by validation accuracy; starting from the best, each next one stays in the soup
    only if the average with it scores at least as well on validation as the soup without it."""
    members = _members(states, labels, score)
    order = sorted(range(len(states)), key=lambda i: -members[i].metrics["val_acc1"])
    soup, current = [order[0]], members[order[0]]
    steps = []
    for index in order[1:]:
        trial = [*soup, index]
        state = weighted_average([states[i] for i in trial], [1.0 / len(trial)] * len(trial))
        metrics = score(state)
        added = metrics["val_acc1"] >= current.metrics["val_acc1"]
        step = Candidate(f"greedy + {labels[index]}", state, metrics, {"members": len(trial), "added": added})
        steps.append(step)
        if added:
            soup, current = trial, step
    final = Candidate(f"greedy soup of {len(soup)}", current.state, current.metrics,
                      {"members": len(soup), "soup": "+".join(labels[i] for i in soup)})
    candidates = [*members, *steps, final]
    return Fused(candidates, len(candidates) - 1)
