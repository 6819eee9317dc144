"""Which epoch's weights a run keeps (``trainer.select``): the one rule the checkpointer applies, the
validator report replays and a Hydra sweeper (Optuna) maximises."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Selection:
    """Keep the epoch with the best ``metric`` in the ``split`` row of metrics.csv, higher or lower being
    better as ``higher`` says; ``LAST`` keeps the latest epoch."""

    split: str
    metric: str
    higher: bool = True

    def better(self, value: float, best: float) -> bool:
        return value > best if self.higher else value < best

    def objective(self, best: dict[str, Any] | None) -> float:
        """What a sweeper maximises for a run whose kept epoch is ``best`` (summary["best"]): its score, negated
        where lower is better; NaN when nothing was selected on a score (the last epoch was kept)."""
        if not best or best["split"] == LAST.split:
            return math.nan
        return float(best["value"]) * (1 if self.higher else -1)


LAST = Selection("last", "epoch")

# trainer.select -> its rule. ``val_acc1`` is the only one that uses labels: the source domain's validation
# split; the others are the label-free validators on the target's train images (engine/validators.py).
VALIDATORS: dict[str, Selection] = {
    "val_acc1": Selection("val", "acc1"),
    "target_entropy": Selection("target_train", "entropy", higher=False),
    "target_im": Selection("target_train", "im"),
    "target_snd": Selection("target_train", "snd"),
}
SELECTIONS = (*VALIDATORS, "last")  # trainer.select: a validator, or simply the last epoch


def selection(select: str) -> Selection:
    """The rule ``trainer.select=select`` names."""
    return VALIDATORS.get(select, LAST)
