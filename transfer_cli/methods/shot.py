"""SHOT (Liang et al. 2020, "Do we really need to access the source data?"): source hypothesis transfer.

Two phases in one run. For ``source_epochs`` epochs the model learns the labelled source alone (label
smoothing, as SHOT trains its source hypothesis). Then the head — the source hypothesis — is frozen and the
body adapts on target batches alone, source-free: information maximisation (confident and diverse
predictions) plus cross-entropy against self-supervised pseudo-labels, the nearest of class centroids that
are re-estimated from the whole unlabelled target train split at the start of every adaptation epoch
(prediction-weighted, then refined once with the hard assignments; cosine distance on features with a
constant 1 appended). Checkpoints are chosen among the adaptation epochs only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from transfer_cli.engine.loop import Hook, State, infer
from transfer_cli.errors import UserError
from transfer_cli.methods.base import METHODS, DataContext, LoaderFactory
from transfer_cli.methods.da_losses import im_loss, mcc_loss
from transfer_cli.methods.domain import DomainAdaptation
from transfer_cli.models.backbone import Classifier
from transfer_cli.registry import Count, Fraction, NonNegative


def _with_bias(features: torch.Tensor) -> torch.Tensor:
    """Features with a constant 1 appended, L2-normalised: the space SHOT measures cosine distances in."""
    ones = torch.ones(len(features), 1, dtype=features.dtype, device=features.device)
    return F.normalize(torch.cat([features, ones], 1), dim=1)


def class_centroids(features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """SHOT's self-supervised centroids (unit rows, one per class): prediction-weighted means of the
    features, then the means of the features each first centroid wins (a class nobody picks gets a zero
    row, which no sample can be nearest to)."""
    points = _with_bias(features.float())
    centroids = probs.T @ points / (probs.sum(0)[:, None] + 1e-8)
    assigned = F.one_hot((points @ F.normalize(centroids, dim=1).T).argmax(1), probs.shape[1]).float()
    return F.normalize(assigned.T @ points / (assigned.sum(0)[:, None] + 1e-8), dim=1)


def nearest_centroid(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return (_with_bias(features.float()) @ centroids.T).argmax(1)


@METHODS.register("shot")
class SHOT(DomainAdaptation):
    """Source training, then source-free adaptation of the body with the head frozen (see the module)."""

    def __init__(self, model: Classifier, *, source_epochs: Count, pseudo_weight: NonNegative,
                 mcc_weight: NonNegative, label_smoothing: Fraction) -> None:
        super().__init__(model, weight=1.0, mcc_weight=mcc_weight, label_smoothing=label_smoothing)
        self.source_epochs, self.pseudo_weight = source_epochs, pseudo_weight
        self.selectable_from = source_epochs  # a checkpoint from the source phase is not an adapted model
        self.adapting = False
        self.centroids: torch.Tensor | None = None

    def loaders(self, make: LoaderFactory, context: DataContext) -> dict[str, DataLoader]:
        loaders = super().loaders(make, context)
        self.target_pass = context.target("train", False)  # unaugmented, for the centroids
        self.device, self.precision = context.device, context.precision
        return loaders

    def training_step(self, batch):
        x_source, y_source, x_target = batch
        if not self.adapting:
            logits = self.model(x_source)
            loss = F.cross_entropy(logits, y_source, label_smoothing=self.label_smoothing)
            return {"loss": loss, "loss_cls": loss.detach(), "logits": logits.detach(), "labels": y_source}
        features = self.model.features(x_target)  # source-free: the source batch is not touched
        logits = self.model.head(features)
        out = {"loss_im": im_loss(logits), "loss_pseudo": F.cross_entropy(logits.float(), self.pseudo_labels(x_target))}
        loss = out["loss_im"] + self.pseudo_weight * out["loss_pseudo"]
        if self.mcc_weight:
            out["loss_mcc"] = mcc_loss(logits)
            loss = loss + self.mcc_weight * out["loss_mcc"]
        # No labels: train accuracy is not defined on the target (pseudo-label agreement would flatter it).
        return {"loss": loss, "logits": logits.detach(), "labels": None} | {k: v.detach() for k, v in out.items()}

    def pseudo_labels(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest centroid of each image's features, computed as in evaluation: dropout would zero half
        of a LeNet's features and scramble the cosine distances."""
        self.eval()
        with torch.no_grad():
            labels = nearest_centroid(self.model.features(x), self.centroids)
        self.train()
        return labels

    def refresh_centroids(self) -> None:
        self.eval()
        features, _labels = infer(self.model.features, self.target_pass, self.device, self.precision)  # unread
        features = features.to(self.device)
        with torch.no_grad():
            probs = self.model.head(features).float().softmax(1)
        self.train()
        self.centroids = class_centroids(features, probs)

    def hooks(self) -> list[Hook]:
        return [*super().hooks(), _Phases(self)]


class _Phases(Hook):
    """Switches SHOT from source training to adaptation at epoch ``source_epochs`` (also on resume)."""

    def __init__(self, method: SHOT) -> None:
        self.method = method

    def before_fit(self, state: State) -> None:
        if state.max_epochs <= self.method.source_epochs:
            raise UserError(f"method.source_epochs={self.method.source_epochs} leaves no epoch to adapt in: the run "
                            f"has {state.max_epochs} epochs. Set method.source_epochs below trainer.epochs.")

    def before_epoch(self, state: State) -> None:
        method = self.method
        method.adapting = state.epoch >= method.source_epochs
        method.model.head.requires_grad_(not method.adapting)  # the source hypothesis stays as learnt
        if method.adapting:
            method.refresh_centroids()
