"""The losses and pieces domain adaptation is built from: gradient reversal and DANN's schedule, domain
discriminators (plain and conditioned on predictions, CDAN), CORAL, multi-kernel MMD, minimum class
confusion (MCC) and information maximisation (SHOT). Pure functions of tensors; the methods that combine
them live in domain.py and shot.py."""

from __future__ import annotations

import math

import torch
from torch import nn

from transfer_cli.engine.validators import entropy, information_maximization


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


def mcc_loss(logits: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """Minimum Class Confusion (Jin et al. 2020) of a target batch: the off-diagonal mass of the row-normalised
    class-correlation matrix Y^T W Y of temperature-scaled predictions, W weighting confident samples more
    (1 + exp(-entropy), normalised to sum to the batch size), divided by the number of classes."""
    probs = (logits.float() / temperature).softmax(1)
    weights = 1 + torch.exp(-entropy(probs).detach())
    weights = len(probs) * weights / weights.sum()
    confusion = probs.T @ (weights[:, None] * probs)
    confusion = confusion / confusion.sum(1, keepdim=True)
    return (confusion.sum() - confusion.trace()) / probs.shape[1]


def im_loss(logits: torch.Tensor) -> torch.Tensor:
    """SHOT's information-maximisation loss: mean prediction entropy minus the entropy of the mean
    prediction (confident per sample, diverse over the batch)."""
    return -information_maximization(logits.float().softmax(1))


class ConditionalMap(nn.Module):
    """CDAN's conditioning of the discriminator input (Long et al. 2018): the multilinear map f ⊗ g of features
    f (d) and class probabilities g (C), flattened to d*C; when d*C exceeds ``max_exact`` the randomized map
    (R_f f ⊙ R_g g) / sqrt(dim) with fixed Gaussian matrices of width ``random_dim`` instead."""

    def __init__(self, feature_dim: int, classes: int, random_dim: int = 1024, max_exact: int = 4096) -> None:
        super().__init__()
        self.randomized = feature_dim * classes > max_exact
        self.out_features = random_dim if self.randomized else feature_dim * classes
        if self.randomized:  # buffers: saved with the method, so a resumed run keeps the same projection
            self.register_buffer("project_features", torch.randn(feature_dim, random_dim))
            self.register_buffer("project_probs", torch.randn(classes, random_dim))

    def forward(self, features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        if self.randomized:
            return (features @ self.project_features) * (probs @ self.project_probs) / math.sqrt(self.out_features)
        return (probs.unsqueeze(2) * features.unsqueeze(1)).flatten(1)
