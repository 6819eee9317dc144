"""Knowledge distillation (Hinton et al. 2015): the run's model, the student, learns from trained teachers'
softened outputs as well as from the labels."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from transfer_cli.errors import UserError
from transfer_cli.methods.base import METHODS, DataContext, LoaderFactory
from transfer_cli.methods.domain import PairedLoader
from transfer_cli.methods.finetune import BackboneLrMult, BNMode, Finetune, LayerDecay
from transfer_cli.models.backbone import Classifier
from transfer_cli.registry import Fraction, Positive, Range

Weight = Annotated[float, Range(ge=0, le=1)]
_MEMO_LIMIT = 200_000  # samples whose teacher outputs are kept (augmented views rarely repeat: bounded memory)


@dataclass(frozen=True)
class Teacher:
    """An opened teacher checkpoint (scoring.open_teachers): its model, and the output index of each of the
    student's classes when the teacher lists them in another order (None: the same order)."""

    path: str
    model: Classifier
    order: list[int] | None


@METHODS.register("distill")
class Distill(Finetune):
    """loss = alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * cross-entropy(labels).
    Several teachers are one ensemble: the mean of their softened probabilities. Each teacher reads the
    student's batch through its own input adapter (its size, channels and normalisation), so augmented images
    get the teacher's view of the same augmentation. A sample seen before (no augmentation: every epoch after
    the first) takes the teachers' outputs from memory, found by its content, so the teachers run once per
    image rather than once per epoch; the plain images' outputs are computed before training.
    ``unlabelled``: each labelled batch comes with a batch of the train
    images the few-shot / fraction draw left unlabelled (labels never read), on which the student learns
    the teachers' outputs alone. Freezing, BN and learning rates as finetune."""

    def __init__(self, model: Classifier, teachers: list[Teacher], *, teacher: str | list[str],
                 temperature: Positive, alpha: Weight, unlabelled: bool, freeze: int | Literal["all"], bn: BNMode,
                 label_smoothing: Fraction, layer_decay: LayerDecay, backbone_lr_mult: BackboneLrMult) -> None:
        super().__init__(model, freeze=freeze, bn=bn, label_smoothing=label_smoothing, layer_decay=layer_decay,
                         backbone_lr_mult=backbone_lr_mult)
        self.temperature, self.alpha, self.unlabelled = float(temperature), float(alpha), unlabelled
        if unlabelled and model.recipe.text is not None:
            raise UserError("method.unlabelled=true is built for image datasets; text students distil on their "
                            "labelled texts only (method.unlabelled=false).")
        self.teacher_paths = [t.path for t in teachers]
        # In a tuple, outside the module tree: no checkpoint, optimizer or state_dict carries the teachers.
        self.teachers: tuple[Teacher, ...] = tuple(teachers)
        for t in self.teachers:
            t.model.eval().requires_grad_(False)
        self._seen: dict[bytes, torch.Tensor] = {}  # a sample's content digest -> the teachers' logits

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's own signature
        """.to(device) / .half() reach the teachers too."""
        for t in self.teachers:
            t.model._apply(fn, recurse)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def teacher_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The teachers' mean probabilities at the temperature, in the student's class order."""
        keys = [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in x.detach().cpu()]
        new = [i for i, key in enumerate(keys) if key not in self._seen]
        if new:
            logits = self._teacher_logits(x[new])
            if len(self._seen) < _MEMO_LIMIT:
                self._seen.update({keys[i]: row for i, row in zip(new, logits.cpu(), strict=True)})
        fresh = dict(zip(new, logits, strict=True)) if new else {}
        logits = torch.stack([fresh[i] if i in fresh else self._seen[key].to(x.device) for i, key in enumerate(keys)])
        return F.softmax(logits / self.temperature, dim=-1).mean(1)

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, teachers, classes): each teacher's logits, its outputs put in the student's class order."""
        out = []
        for t in self.teachers:
            logits = t.model(x).float()
            out.append(logits[:, t.order] if t.order is not None else logits)
        return torch.stack(out, dim=1)

    def loaders(self, make: LoaderFactory, context: DataContext) -> dict[str, DataLoader]:
        loaders = super().loaders(make, context)
        plain = [make("train", False)]
        if self.unlabelled:
            plain.append(self._unlabelled(make, False))
            loaders["train"] = PairedLoader(loaders["train"], self._unlabelled(make, True))
        # The teachers' outputs for the plain images, computed before training in a fixed order: a resumed run
        # (whose memory starts empty) then trains on exactly the soft targets the uninterrupted run saw.
        for loader in plain:
            for x, *_ in loader:
                self.teacher_probs(x)
        return loaders

    @staticmethod
    def _unlabelled(make: LoaderFactory, train: bool) -> DataLoader:
        """Batches of the train images the few-shot / fraction draw left unlabelled."""
        try:
            images = make("unlabelled", train)
        except LookupError:  # nothing was drawn
            images = None
        if images is None or len(images) == 0:
            raise UserError("method.unlabelled=true distils on the train images that dataset.shots or "
                            "dataset.fraction leave unlabelled, and this run's train split keeps them all: set "
                            "dataset.shots=K (or dataset.fraction), or method.unlabelled=false.")
        return images

    def training_step(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        x, y, *unlabelled = batch  # with unlabelled=true: (labelled images, labels, unlabelled images)
        inputs = torch.cat([x, *unlabelled]) if unlabelled else x
        logits = self.model(inputs)
        soft = F.kl_div(F.log_softmax(logits.float() / self.temperature, dim=1), self.teacher_probs(inputs),
                        reduction="batchmean") * self.temperature**2
        logits = logits[:len(x)]
        hard = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        loss = self.alpha * soft + (1 - self.alpha) * hard
        return {"loss": loss, "loss_soft": soft.detach(), "loss_hard": hard.detach(), "logits": logits.detach(),
                "labels": y}

    def describe(self) -> dict:
        return {**super().describe(), "teachers": self.teacher_paths}
