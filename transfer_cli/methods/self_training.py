"""Self-training for domain adaptation: FixMatch (Sohn et al. 2020) carried to an unlabelled target domain
(as AdaMatch, Berthelot et al. 2022, which also trains on strong views of the source).

Every step the model predicts each target image in its plain (weakly augmented) view; where it is confident
(max probability >= ``threshold``) the prediction becomes a pseudo-label, and the model learns to give it
to a *strong* view of the same image (random channel order, inversion, per-channel contrast and
brightness, grayscale, cutout). The strong views teach that what the domains differ in (colour, polarity,
texture) is irrelevant; the confident predictions spread from the easy target images to the hard ones.
With ``strong_source`` the source batch is also seen in a strong view (cross-entropy on both), so the
classifier learns colour- and polarity-invariant features before any pseudo-label exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transfer_cli.data.augment import strong_colour_batch
from transfer_cli.errors import UserError
from transfer_cli.methods.base import METHODS
from transfer_cli.methods.domain import DomainAdaptation
from transfer_cli.models.backbone import Classifier
from transfer_cli.registry import Fraction, NonNegative


def pseudo_label_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor,
                      threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's unlabelled loss: cross-entropy of the strong view against the weak view's argmax, for the
    samples whose weak max probability reaches ``threshold``, averaged over the whole batch (so few confident
    samples give a small loss); and the fraction of samples that passed."""
    confidence, labels = weak_logits.detach().float().softmax(1).max(1)
    mask = (confidence >= threshold).float()
    loss = (F.cross_entropy(strong_logits.float(), labels, reduction="none") * mask).mean()
    return loss, mask.mean()


@METHODS.register("fixmatch_da")
class FixMatchDA(DomainAdaptation):
    """Source cross-entropy (plain and strong views, averaged) + ``weight`` x pseudo-label cross-entropy on strong
    target views (see the module), ramped in with DANN's lambda_p; ``mcc_weight`` adds MCC on the plain target
    predictions."""

    def __init__(self, model: Classifier, *, weight: NonNegative, threshold: Fraction, strong_source: bool,
                 mcc_weight: NonNegative, label_smoothing: Fraction) -> None:
        if model.recipe.input is None:
            raise UserError("method=fixmatch_da learns from strong views of images (colour, inversion, cutout), and "
                            "this model reads text. For text, use a method without image augmentation (e.g. "
                            "source_only, dann, mcc).")
        super().__init__(model, weight=weight, mcc_weight=mcc_weight, label_smoothing=label_smoothing)
        self.threshold, self.strong_source = threshold, strong_source

    def training_step(self, batch):
        x_source, y_source, x_target = batch
        channels = self.model.input.channels
        views = [x_source, x_target, strong_colour_batch(x_target, channels)]
        if self.strong_source:
            views.append(strong_colour_batch(x_source, channels))
        source, weak, strong, *strong_source = self.forward_views(*views)
        loss_cls = sum(F.cross_entropy(view.logits, y_source, label_smoothing=self.label_smoothing)
                       for view in (source, *strong_source)) / (1 + len(strong_source))
        loss_pseudo, passed = pseudo_label_loss(weak.logits, strong.logits, self.threshold)
        extra = {"loss_pseudo": loss_pseudo, "pseudo_rate": 100 * passed}
        return self.step_output(loss_cls, extra, source.logits, y_source, weak.logits)
