"""Transferability scores: how well a frozen model's features (and, where it has one, its source classifier)
fit a labelled target task, from one forward pass and no training. Higher is better for every score.

Each function takes float64 NumPy arrays: ``features`` [N, D], integer ``labels`` [N] in 0..C-1, and for the
scores that need a source classifier, its class probabilities ``source_probs`` [N, Z].
"""

from __future__ import annotations

import numpy as np
from scipy import linalg, optimize
from sklearn.covariance import ledoit_wolf_shrinkage


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME (You et al., ICML 2021): the maximum marginal evidence per sample of a Bayesian linear regression
    from the features to each class's one-hot column (weights ~ N(0, 1/alpha), noise ~ N(0, 1/beta)),
    averaged over classes.

    Written in sample space, y ~ N(0, F F^T / alpha + I / beta), the evidence needs only the N x N Gram
    matrix's eigenvalues, whatever D is. The published fixed point works in feature space with the N
    singular values of F and drops the log(alpha) terms of the D - N zero eigenvalues of F^T F when N < D:
    wrong exactly when a model's features are wider than the labelled data (a few-shot target). When N <= D
    a one-hot column is usually fitted exactly and the evidence grows toward beta -> infinity; profiling beta
    out and searching the ratio alpha / beta over a bounded range gives that limit to within rounding.
    """
    n = len(labels)
    u, s, _ = np.linalg.svd(features, full_matrices=False)
    s2 = s**2
    onehot = np.eye(int(labels.max()) + 1)[labels]
    projected = u.T @ onehot  # [r, C]: each class column in the Gram matrix's eigenbasis
    outside = np.maximum((onehot**2).sum(0) - (projected**2).sum(0), 0.0)  # what no linear map of F reaches
    scale = float(s2.max()) if len(s2) and s2.max() > 0 else 1.0
    return float(np.mean([_max_evidence(s2, z, r, n, scale) for z, r in zip(projected.T, outside, strict=True)]))


def _max_evidence(s2: np.ndarray, z: np.ndarray, outside: float, n: int, scale: float) -> float:
    def negative(log_ratio: float) -> float:
        return -profile_evidence(s2, z, outside, n, float(np.exp(log_ratio)))

    low, high = np.log(scale) - 30, np.log(scale) + 30
    grid = np.linspace(low, high, 121)
    best = int(np.argmin([negative(t) for t in grid]))
    bracket = (grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)])
    refined = optimize.minimize_scalar(negative, bounds=bracket, method="bounded", options={"xatol": 1e-10})
    return -min(refined.fun, negative(grid[best]))


def profile_evidence(s2: np.ndarray, z: np.ndarray, outside: float, n: int, ratio: float) -> float:
    """max over beta of log p(y | F, alpha = ratio * beta, beta) / N. With K = F F^T / ratio + I (eigenvalues
    s2 / ratio + 1, and 1 outside F's range): y ~ N(0, K / beta), maximised at beta = N / (y^T K^-1 y)."""
    eig = s2 / ratio + 1.0
    quadratic = float((z**2 / eig).sum()) + outside
    beta = n / max(quadratic, 1e-300)
    return -0.5 * (n * np.log(2 * np.pi) - n * np.log(beta) + float(np.log(eig).sum()) + n) / n


def leep(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP (Nguyen et al., ICML 2020): the mean log-likelihood of the target labels under the "expected
    empirical predictor" that maps the source classifier's probabilities to target classes through their
    empirical joint distribution."""
    joint = np.eye(int(labels.max()) + 1)[labels].T @ source_probs / len(labels)  # P(y, z): [C, Z]
    conditional = joint / np.maximum(joint.sum(0, keepdims=True), 1e-300)  # P(y | z)
    likelihood = (source_probs * conditional[labels]).sum(1)
    return float(np.log(np.maximum(likelihood, 1e-300)).mean())


def nce(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """NCE (Tran et al., ICCV 2019): minus the conditional entropy H(Y | Z) of the target labels given the
    source classifier's hard predictions."""
    predicted = source_probs.argmax(1)
    joint = np.zeros((int(labels.max()) + 1, source_probs.shape[1]))
    np.add.at(joint, (labels, predicted), 1.0 / len(labels))
    marginal = joint.sum(0, keepdims=True)
    present = joint > 0
    return float((joint[present] * np.log(joint[present] / np.broadcast_to(marginal, joint.shape)[present])).sum())


def h_score(features: np.ndarray, labels: np.ndarray, shrink: bool = True) -> float:
    """H-score (Bao et al., ICIP 2019): tr(cov(f)^-1 cov(E[f | y])). With ``shrink``, the feature covariance
    is the Ledoit-Wolf estimate and the between-class covariance is scaled by (1 - shrinkage), as Ibrahim et
    al. (ICLR 2023) regularise it: the plain inverse is unstable when N is not far above D."""
    centred = features - features.mean(0)
    classes = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=classes).astype(float)
    means = np.zeros((classes, features.shape[1]))
    np.add.at(means, labels, centred)
    means /= np.maximum(counts, 1)[:, None]
    weights = counts / len(labels)  # cov(E[f|y]) = sum_c p_c mu_c mu_c^T
    if shrink:
        shrinkage = float(ledoit_wolf_shrinkage(centred, assume_centered=True))
        inverse_means = _shrunk_solve(centred, shrinkage, means.T)
        scale = 1.0 - shrinkage
    else:
        inverse_means = np.linalg.pinv(centred.T @ centred / len(labels)) @ means.T
        scale = 1.0
    return float(scale * (weights * (means * inverse_means.T).sum(1)).sum())


def _shrunk_solve(centred: np.ndarray, shrinkage: float, rhs: np.ndarray) -> np.ndarray:
    """((1 - s) X^T X / N + s mu I)^-1 rhs, mu = tr(X^T X / N) / D: Ledoit-Wolf's estimate (H-score) or SFDA's
    shrunk within-class covariance (X the samples minus their class means) applied without forming it. When D > N the Woodbury identity solves an N x N system instead of a D x D one (a 1280-wide
    few-shot candidate: 25x faster, which the bootstrap repeats)."""
    n, d = centred.shape
    a = shrinkage * (centred**2).sum() / (n * d)
    b = (1 - shrinkage) / n
    if d <= n or a <= 0:
        return linalg.solve(b * centred.T @ centred + a * np.eye(d), rhs, assume_a="pos")
    inner = linalg.solve(a * np.eye(n) + b * centred @ centred.T, centred @ rhs, assume_a="pos")
    return (rhs - b * centred.T @ inner) / a


def sfda(features: np.ndarray, labels: np.ndarray) -> float:
    """SFDA (Shao et al., ECCV 2022): the mean probability of the true class under a regularised Fisher
    discriminant, fitted a second time on "self-challenging" features (each sample pulled toward the other
    classes' mean by how unsure the first fit was about it). The regularisation shrinks the within-class
    covariance toward a multiple of the identity by exp(-5 x its largest eigenvalue), as the paper does."""
    first, shrinkage = _fisher_probs(features, labels, None)
    softened = np.exp(first) / np.exp(first).sum(1, keepdims=True)  # the paper's softening before the mix
    classes = int(labels.max()) + 1
    means = np.stack([features[labels == c].mean(0) for c in range(classes)])
    others = (means.sum(0) - means) / max(classes - 1, 1)
    sure = softened[np.arange(len(labels)), labels][:, None]
    mixed = sure * features + (1 - sure) * others[labels]
    second, _ = _fisher_probs(mixed, labels, shrinkage)
    return float(second[np.arange(len(labels)), labels].mean())


def _fisher_probs(features: np.ndarray, labels: np.ndarray, shrinkage: float | None) -> tuple[np.ndarray, float]:
    """Class posteriors of a linear discriminant whose within-class covariance is shrunk toward mu I. (The
    paper's projection on every generalised eigenvector of (S_b, S_w) gives the same discriminant: the
    eigenvectors V satisfy V V^T = S_w^-1.)"""
    classes = int(labels.max()) + 1
    n, d = features.shape
    priors = np.bincount(labels, minlength=classes) / n
    means = np.stack([features[labels == c].mean(0) for c in range(classes)])
    spread = features - means[labels]  # sum_c p_c cov_c = spread^T spread / N
    if shrinkage is None:  # the largest eigenvalue of the within-class covariance, from the smaller Gram matrix
        small = spread.T @ spread if d <= n else spread @ spread.T
        shrinkage = max(float(np.exp(-5 * np.linalg.eigvalsh(small / n)[-1])), 1e-10)
    coef = _shrunk_solve(spread, shrinkage, means.T).T  # [C, D]; N x N when N < D (D x D at 20,000 TF-IDF
    # features is 3 GB per matrix, and solving it crashed the process)
    scores = features @ coef.T - 0.5 * (means * coef).sum(1) + np.log(priors)
    scores -= scores.max(1, keepdims=True)
    probs = np.exp(scores)
    return probs / probs.sum(1, keepdims=True), shrinkage


def knn_loo(features: np.ndarray, labels: np.ndarray, k: int = 5, groups: np.ndarray | None = None) -> float:
    """Leave-one-out k-nearest-neighbour top-1 (percent) on L2-normalised features: each sample is classified by
    the majority label of its k nearest others (ties: the smallest label, as scikit-learn breaks them).
    ``groups``: samples with the same group id never count as each other's neighbours (bootstrap copies)."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    squared = (unit**2).sum(1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * unit @ unit.T, 0.0)
    groups = np.arange(len(labels)) if groups is None else groups
    distances[groups[:, None] == groups[None, :]] = np.inf
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(labels), int(labels.max()) + 1))
    np.add.at(votes, (np.repeat(np.arange(len(labels)), k), labels[nearest].ravel()), 1)
    return float(100 * (votes.argmax(1) == labels).mean())

