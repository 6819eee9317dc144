"""The interface between a transfer method and the generic training loop."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transfer_cli.errors import UserError
from transfer_cli.models.backbone import Classifier, describe_stage

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class Method(nn.Module):
    """Wraps a Classifier; owns which parameters train, the loss, and any hooks it needs.

    The loop only calls ``param_groups``, ``training_step``, ``predict``, ``hooks`` and ``train``;
    it never asks which method it runs.
    """

    def __init__(self, model: Classifier, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.frozen_norms: list[nn.Module] = []

    # -- freezing -----------------------------------------------------------------------------
    def freeze_stages(self, depth: int | str, key: str = "method.freeze") -> int:
        """Freeze the first ``depth`` stages (``all``: every stage; the head never freezes)."""
        stages = self.model.stages
        count = len(stages) if depth == "all" else depth
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= len(stages):
            names = ", ".join(f"{i + 1}={describe_stage(s)}" for i, s in enumerate(stages))
            raise UserError(
                f"{key}={depth!r} is out of range: backbone={self.model.backbone_name} has {len(stages)} "
                f"stages ({names}). Allowed: 0..{len(stages)} or all."
            )
        for index in range(count):
            for p in self.model.stage_parameters(index):
                p.requires_grad_(False)
            self.frozen_norms += [m for m in self.model.stage_modules(index) if isinstance(m, _NORMS)]
        return count

    def freeze_norms(self) -> None:
        """BatchNorm as a fixed affine map: running statistics and affine parameters stay as loaded."""
        for m in self.model.body.modules():
            if isinstance(m, _NORMS):
                m.requires_grad_(False)
                self.frozen_norms.append(m)

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for m in self.frozen_norms:  # frozen statistics must not drift with the batches seen
            m.eval()
        return self

    # -- what the loop calls ------------------------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Trainable parameters only; biases and norm weights get no weight decay."""
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim > 1 else no_decay).append(p)
        groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                  {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns ``loss`` (what is optimised), ``logits`` and ``labels`` (for train accuracy),
        and optionally more ``loss_*`` terms to log."""
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits.detach(), "labels": y}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def hooks(self) -> list:
        return []

    def describe(self) -> dict[str, Any]:
        """Facts about the trainable setup for the run summary."""
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"params_total": total, "params_trainable": trainable}
