"""Unsupervised domain adaptation: a labelled source and an unlabelled target trained together.

Reusable pieces (gradient reversal, the DANN schedule, a domain discriminator, CORAL and multi-kernel
MMD losses, the paired source/target loader) and the methods built from them: source_only, dann,
coral, dan. Target labels never reach a loss: the paired loader drops them before a batch exists.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from transfer_cli.engine.loop import Hook, State
from transfer_cli.methods.base import METHODS, DataContext, LoaderFactory, Method
from transfer_cli.models.backbone import Classifier
from transfer_cli.registry import Count, Fraction, NonNegative


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by -scale backward (Ganin & Lempitsky 2015)."""
    return _GradReverse.apply(x, scale)


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """lambda_p = 2 / (1 + exp(-gamma p)) - 1: 0 at the start, approaching 1 as training ends."""
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


class DomainDiscriminator(nn.Sequential):
    """MLP from features to one logit: source (1) or target (0)."""

    def __init__(self, in_features: int, hidden: int = 500) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, 1))


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL (Sun & Saenko 2016): squared Frobenius distance of feature covariances / (4 d^2)."""
    d = source.shape[1]
    cs, ct = torch.cov(source.T.float()), torch.cov(target.T.float())
    return ((cs - ct) ** 2).sum() / (4 * d * d)


def mmd_loss(source: torch.Tensor, target: torch.Tensor, multipliers=(0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    """Multi-kernel MMD^2 (Long et al. 2015, DAN): Gaussian kernels whose bandwidths are multiples of
    the mean pairwise squared distance, biased estimate over the batch."""
    x = torch.cat([source, target]).float()
    norms = (x * x).sum(1)
    distances = (norms[:, None] + norms[None, :] - 2 * x @ x.T).clamp_min(0)  # squared, smooth at 0
    # Collapsed features (all equal) would give a zero bandwidth and NaN kernels.
    bandwidth = (distances.detach().sum() / (len(x) ** 2 - len(x))).clamp_min(1e-6)
    kernels = sum(torch.exp(-distances / (bandwidth * m)) for m in multipliers)
    n = len(source)
    return kernels[:n, :n].mean() + kernels[n:, n:].mean() - 2 * kernels[:n, n:].mean()


class PairedLoader:
    """One epoch over the source loader, each batch paired with the next target batch from an endless
    (re-shuffled) pass over the target; yields (x_source, y_source, x_target) — no target labels.

    ``state_dict`` records the source's shuffling generator and where the target pass stands (its
    generator at the start of the pass, batches taken since), so a resumed run draws the same pairs."""

    def __init__(self, source: DataLoader, target: DataLoader) -> None:
        self.source, self.target = source, target
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


class DomainAdaptation(Method):
    """Cross-entropy on labelled source batches plus ``weight`` x an adaptation loss between source and
    target features. Subclasses define ``adaptation``; source_only has none.

    The adaptation loss is warmed in with DANN's lambda_p: before the classifier has learned anything,
    a full-strength alignment loss can make every feature equal (zero MMD/CORAL), and dead ReLUs never
    recover. DANN itself gets lambda_p through its gradient reversal instead (``ramp = False``)."""

    needs_target_data = True
    ramp = True

    def __init__(self, model: Classifier, *, weight: NonNegative, label_smoothing: Fraction) -> None:
        super().__init__(model, label_smoothing=label_smoothing)
        self.weight = weight
        self.progress = 0.0

    def loaders(self, make: LoaderFactory, context: DataContext) -> dict[str, DataLoader]:
        assert context.target is not None, "validation refuses a domain-adaptation method without target="
        loaders = super().loaders(make, context)
        loaders["train"] = PairedLoader(loaders["train"], context.target("train", True))
        return loaders

    def adaptation(self, source: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def training_step(self, batch):
        x_source, y_source, x_target = batch
        # Each domain is brought to the model's input size first; one body pass sees both (shared BN batch).
        features = self.model.body(torch.cat([self.model.input(x_source), self.model.input(x_target)]))
        source, target = features[: len(x_source)], features[len(x_source):]
        logits = self.model.head(source)
        loss_cls = F.cross_entropy(logits, y_source, label_smoothing=self.label_smoothing)
        extra = self.adaptation(source, target)
        weight = self.weight * (dann_lambda(self.progress) if self.ramp else 1.0)
        loss = loss_cls + sum((weight * v for k, v in extra.items() if k.startswith("loss_")), torch.zeros(()))
        out = {"loss": loss, "loss_cls": loss_cls.detach(), "logits": logits.detach(), "labels": y_source}
        return out | {k: v.detach() for k, v in extra.items()}

    def hooks(self) -> list[Hook]:
        return [_Progress(self)]


@METHODS.register("source_only")
class SourceOnly(DomainAdaptation):
    """The baseline: the same paired batches and schedule, no adaptation loss."""



@METHODS.register("dann")
class DANN(DomainAdaptation):
    """Domain-adversarial training: a discriminator tells source from target features through a
    gradient reversal layer whose strength follows lambda_p (Ganin & Lempitsky 2015)."""

    ramp = False

    def __init__(self, model: Classifier, *, weight: NonNegative, gamma: NonNegative, hidden: Count,
                 label_smoothing: Fraction) -> None:
        super().__init__(model, weight=weight, label_smoothing=label_smoothing)
        self.gamma = gamma
        self.discriminator = DomainDiscriminator(_feature_dim(model), hidden)

    def param_groups(self, lr, weight_decay, params=None):
        groups = super().param_groups(lr, weight_decay, params)
        if params is None:  # the discriminator trains from the start, at the base learning rate
            groups.append({"params": list(self.discriminator.parameters()), "lr": lr,
                           "weight_decay": weight_decay})
        return groups

    def adaptation(self, source, target):
        scale = dann_lambda(self.progress, self.gamma)
        features = grad_reverse(torch.cat([source, target]), scale)
        logits = self.discriminator(features).squeeze(1)
        domain = torch.cat([torch.ones(len(source)), torch.zeros(len(target))]).to(logits.device)
        loss = F.binary_cross_entropy_with_logits(logits.float(), domain)
        accuracy = 100.0 * ((logits > 0).float() == domain).float().mean()
        return {"loss_domain": loss, "domain_acc": accuracy, "lambda": torch.tensor(scale)}


def _feature_dim(model: Classifier) -> int:
    return next(m for m in model.head if isinstance(m, nn.Linear)).in_features


@METHODS.register("coral")
class CORAL(DomainAdaptation):
    """Deep CORAL: align second-order statistics of source and target features."""


    def adaptation(self, source, target):
        return {"loss_coral": coral_loss(source, target)}


@METHODS.register("dan")
class DAN(DomainAdaptation):
    """Deep Adaptation Network: multi-kernel MMD between source and target features."""


    def adaptation(self, source, target):
        return {"loss_mmd": mmd_loss(source, target)}
