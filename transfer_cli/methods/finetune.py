"""Fine-tuning with the first k backbone stages frozen (k=all: only the head trains)."""

from __future__ import annotations

from typing import Literal

from transfer_cli.methods.base import Method
from transfer_cli.models.backbone import Classifier
from transfer_cli.registries import METHODS


@METHODS.register("finetune")
class Finetune(Method):
    def __init__(
        self,
        model: Classifier,
        freeze: int | str = 0,
        bn: Literal["train", "frozen"] = "train",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(model, label_smoothing=label_smoothing)
        self.frozen_stages = self.freeze_stages(freeze)
        if bn == "frozen":
            self.freeze_norms()

    def describe(self) -> dict:
        return {**super().describe(), "frozen_stages": self.frozen_stages, "stages": len(self.model.stages)}
