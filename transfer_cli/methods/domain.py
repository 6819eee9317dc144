"""Unsupervised domain adaptation: a labelled source and an unlabelled target trained together.

The paired source/target loader, the base method (source cross-entropy + weighted adaptation losses on
source and target features and logits, + optional MCC) and the methods built on it: source_only, dann,
cdan, cdan_e, coral, dan, mcc. Their losses are in da_losses.py; SHOT in shot.py. Target labels never
reach a loss: the paired loader drops them before a batch exists.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from transfer_cli.engine.distributed import SINGLE
from transfer_cli.engine.loop import Hook, State
from transfer_cli.engine.validators import entropy
from transfer_cli.methods.base import METHODS, DataContext, LoaderFactory, Method
from transfer_cli.methods.da_losses import (
    ConditionalMap,
    DomainDiscriminator,
    coral_loss,
    dann_lambda,
    grad_reverse,
    mcc_loss,
    mmd_loss,
)
from transfer_cli.models.backbone import Classifier
from transfer_cli.registry import Count, Fraction, NonNegative, Positive


class PairedLoader:
    """One epoch over the source loader, each batch paired with the next target batch from an endless
    (re-shuffled) pass over the target; yields (x_source, y_source, x_target) — no target labels.

    ``state_dict`` records the source's shuffling generator and where the target pass stands (its
    generator at the start of the pass, batches taken since), so a resumed run draws the same pairs."""

    def __init__(self, source: DataLoader, target: DataLoader) -> None:
        self.source, self.target = source, target
        self.dist = getattr(source, "dist", SINGLE)  # both sides are sharded per process alike
        self._target_iter: Iterator | None = None
        self._pass_start: torch.Tensor | None = None
        self._taken = 0

    def __len__(self) -> int:
        return len(self.source)

    def _start_pass(self, generator_state: torch.Tensor | None = None) -> None:
        generator = getattr(self.target, "generator", None)  # None: an unshuffled iterable
        if generator_state is not None:
            generator.set_state(generator_state)
        self._pass_start = generator.get_state() if generator is not None else None
        self._target_iter, self._taken = iter(self.target), 0

    def _next_target(self) -> torch.Tensor:
        if self._target_iter is None:
            self._start_pass()
        try:
            images, _labels = next(self._target_iter)
        except StopIteration:
            self._start_pass()
            images, _labels = next(self._target_iter)
        self._taken += 1
        return images

    def __iter__(self):
        for x_source, y_source in self.source:
            yield x_source, y_source, self._next_target()

    def state_dict(self) -> dict:
        generator = getattr(self.source, "generator", None)
        return {"source": generator.get_state() if generator is not None else None,
                "target_pass_start": self._pass_start, "target_taken": self._taken}

    def load_state_dict(self, saved: dict) -> None:
        if saved["source"] is not None:
            self.source.generator.set_state(saved["source"])
        if saved["target_pass_start"] is not None:
            self._start_pass(saved["target_pass_start"])
            for _ in range(saved["target_taken"]):  # replay the pass up to where it stood
                next(self._target_iter)
            self._taken = saved["target_taken"]


class _Progress(Hook):
    """Tells the method how far training is (p in [0, 1]) before every step."""

    def __init__(self, method: DomainAdaptation) -> None:
        self.method = method

    def before_epoch(self, state: State) -> None:
        self.total = max(1, state.max_epochs * state.steps_per_epoch)
        self.method.progress = state.epoch * state.steps_per_epoch / self.total

    def after_step(self, state: State) -> None:
        self.method.progress = (state.epoch * state.steps_per_epoch + state.batch + 1) / self.total


class Domain(NamedTuple):
    """One domain's half of a paired batch, as the adaptation losses see it."""

    features: torch.Tensor  # penultimate features, [N, d]
    logits: torch.Tensor  # the head's outputs, [N, classes]


class DomainAdaptation(Method):
    """Cross-entropy on labelled source batches plus ``weight`` x the method's adaptation losses, which see
    both domains' features and logits, plus ``mcc_weight`` x minimum class confusion on the target logits
    (MCC composes with every method; ``method=mcc`` is it alone). Subclasses define ``adaptation``.

    The adaptation loss is warmed in with DANN's lambda_p: before the classifier has learned anything,
    a full-strength alignment loss can make every feature equal (zero MMD/CORAL), and dead ReLUs never
    recover. The adversarial methods get lambda_p through gradient reversal instead (``ramp = False``)."""

    needs_target_data = True
    ramp = True

    def __init__(self, model: Classifier, *, weight: NonNegative, mcc_weight: NonNegative,
                 label_smoothing: Fraction) -> None:
        super().__init__(model, label_smoothing=label_smoothing)
        self.weight, self.mcc_weight = weight, mcc_weight
        self.progress = 0.0

    def loaders(self, make: LoaderFactory, context: DataContext) -> dict[str, DataLoader]:
        assert context.target is not None, "validation refuses a domain-adaptation method without target="
        loaders = super().loaders(make, context)
        loaders["train"] = PairedLoader(loaders["train"], context.target("train", True))
        return loaders

    def adaptation(self, source: Domain, target: Domain) -> dict[str, torch.Tensor]:
        """Loss terms (keys ``loss_*``, weighted by ``weight``) and scalars to log (any other key)."""
        return {}

    def forward_views(self, *views: torch.Tensor) -> list[Domain]:
        """Each view (a domain's batch, or an augmented copy of one) is brought to the model's input first
        (channels and size may differ); then one body pass sees them all (a shared BN batch)."""
        features = self.model.body(torch.cat([self.model.input(v) for v in views]))
        logits = self.model.head(features)
        sizes = [len(v) for v in views]
        return [Domain(f, g) for f, g in zip(features.split(sizes), logits.split(sizes), strict=True)]

    def training_step(self, batch):
        x_source, y_source, x_target = batch
        source, target = self.forward_views(x_source, x_target)
        loss_cls = F.cross_entropy(source.logits, y_source, label_smoothing=self.label_smoothing)
        return self.step_output(loss_cls, self.adaptation(source, target), source.logits, y_source, target.logits)

    def step_output(self, loss_cls: torch.Tensor, extra: dict[str, torch.Tensor], source_logits: torch.Tensor,
                    y_source: torch.Tensor, target_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's total loss — ``loss_cls`` + the ramped ``weight`` x every ``loss_*`` term of ``extra`` +
        ``mcc_weight`` x MCC on ``target_logits`` — and what the loop logs."""
        weight = self.weight * (dann_lambda(self.progress) if self.ramp else 1.0)
        loss = loss_cls + sum((weight * v for k, v in extra.items() if k.startswith("loss_")), torch.zeros(()))
        if self.mcc_weight:
            extra["loss_mcc"] = mcc_loss(target_logits)
            loss = loss + self.mcc_weight * extra["loss_mcc"]
        out = {"loss": loss, "loss_cls": loss_cls.detach(), "logits": source_logits.detach(), "labels": y_source}
        return out | {k: v.detach() for k, v in extra.items()}

    def hooks(self) -> list[Hook]:
        return [_Progress(self)]


@METHODS.register("source_only")
class SourceOnly(DomainAdaptation):
    """The baseline: the same paired batches and schedule, no adaptation loss."""


@METHODS.register("mcc")
class MCC(DomainAdaptation):
    """Minimum Class Confusion alone (Jin et al. 2020): source cross-entropy + mcc_weight x MCC on the target."""

    def __init__(self, model: Classifier, *, mcc_weight: Positive, label_smoothing: Fraction) -> None:
        super().__init__(model, weight=0.0, mcc_weight=mcc_weight, label_smoothing=label_smoothing)


@METHODS.register("dann")
class DANN(DomainAdaptation):
    """Domain-adversarial training: a discriminator tells source from target features through a
    gradient reversal layer whose strength follows lambda_p (Ganin & Lempitsky 2015)."""

    ramp = False

    def __init__(self, model: Classifier, *, weight: NonNegative, gamma: NonNegative, hidden: Count,
                 mcc_weight: NonNegative, label_smoothing: Fraction) -> None:
        super().__init__(model, weight=weight, mcc_weight=mcc_weight, label_smoothing=label_smoothing)
        self.gamma = gamma
        self.discriminator = DomainDiscriminator(self.build_domain_input(), hidden)

    def build_domain_input(self) -> int:
        """Builds whatever turns features into the discriminator's input (before the discriminator, so its
        random initialisation comes first) and returns the input's width."""
        return self.model.feature_dim

    def param_groups(self, lr, weight_decay, params=None):
        groups = super().param_groups(lr, weight_decay, params)
        if params is None:  # the discriminator trains from the start, at the base learning rate
            groups.append({"params": list(self.discriminator.parameters()), "lr": lr,
                           "weight_decay": weight_decay})
        return groups

    def domain_inputs(self, source: Domain, target: Domain) -> torch.Tensor:
        return torch.cat([source.features, target.features])

    def sample_weights(self, source: Domain, target: Domain) -> torch.Tensor | None:
        return None

    def adaptation(self, source, target):
        scale = dann_lambda(self.progress, self.gamma)
        logits = self.discriminator(grad_reverse(self.domain_inputs(source, target), scale)).squeeze(1)
        domain = torch.cat([torch.ones(len(source.features)), torch.zeros(len(target.features))]).to(logits.device)
        weights = self.sample_weights(source, target)
        loss = F.binary_cross_entropy_with_logits(logits.float(), domain, weight=weights, reduction="sum")
        loss = loss / (weights.sum() if weights is not None else len(domain))
        accuracy = 100.0 * ((logits > 0).float() == domain).float().mean()
        return {"loss_domain": loss, "domain_acc": accuracy, "lambda": torch.tensor(scale)}


@METHODS.register("cdan")
class CDAN(DANN):
    """Conditional adversarial adaptation (Long et al. 2018): the discriminator sees features ⊗ class
    probabilities (randomized above 4096 dims), so it aligns the joint of features and predictions."""

    def __init__(self, model: Classifier, *, weight: NonNegative, gamma: NonNegative, hidden: Count,
                 random_dim: Count, mcc_weight: NonNegative, label_smoothing: Fraction) -> None:
        self.random_dim = random_dim
        super().__init__(model, weight=weight, gamma=gamma, hidden=hidden, mcc_weight=mcc_weight,
                         label_smoothing=label_smoothing)

    def build_domain_input(self) -> int:
        self.conditional = ConditionalMap(self.model.feature_dim, _classes(self.model), self.random_dim)
        return self.conditional.out_features

    def domain_inputs(self, source, target):
        # The probabilities condition the discriminator; the reversed gradient reaches the features only.
        probs = torch.cat([source.logits, target.logits]).float().softmax(1).detach()
        return self.conditional(torch.cat([source.features, target.features]).float(), probs)


@METHODS.register("cdan_e")
class CDANE(CDAN):
    """CDAN+E: each sample's domain loss weighted by 1 + exp(-entropy) of its prediction, normalised within
    each domain, so confident (transferable) samples count more."""

    def sample_weights(self, source, target):
        weights = []
        for domain in (source, target):
            w = 1 + torch.exp(-entropy(domain.logits.detach().float().softmax(1)))
            weights.append(w / w.sum())
        return torch.cat(weights)


def _classes(model: Classifier) -> int:
    return [m for m in model.head if isinstance(m, nn.Linear)][-1].out_features


@METHODS.register("coral")
class CORAL(DomainAdaptation):
    """Deep CORAL: align second-order statistics of source and target features."""

    def adaptation(self, source, target):
        return {"loss_coral": coral_loss(source.features, target.features)}


@METHODS.register("dan")
class DAN(DomainAdaptation):
    """Deep Adaptation Network: multi-kernel MMD between source and target features."""

    def adaptation(self, source, target):
        return {"loss_mmd": mmd_loss(source.features, target.features)}
