"""The two reference points of any transfer comparison: a frozen backbone and no transfer at all."""

from __future__ import annotations

from transfer_cli.methods.base import Method
from transfer_cli.models.backbone import Classifier
from transfer_cli.registries import METHODS


@METHODS.register("linear_probe")
class LinearProbe(Method):
    """Backbone frozen as a fixed feature extractor (BatchNorm included); only the linear head trains."""

    def __init__(self, model: Classifier, label_smoothing: float = 0.0) -> None:
        super().__init__(model, label_smoothing=label_smoothing)
        self.freeze_stages("all")
        self.freeze_norms()


@METHODS.register("scratch")
class Scratch(Method):
    """Every layer re-initialised and trained: what the task reaches with no pretrained knowledge."""

    def __init__(self, model: Classifier, label_smoothing: float = 0.0) -> None:
        super().__init__(model, label_smoothing=label_smoothing)
        for module in model.body.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
