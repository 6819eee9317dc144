"""Each transferability score against a direct or reference computation on small data."""

import numpy as np
import pytest
from scipy import linalg, optimize
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import LeaveOneOut, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from transfer_cli.transferability import (
    _fisher_probs,
    _shrunk_solve,
    h_score,
    knn_loo,
    leep,
    logme,
    nce,
    sfda,
)


def clusters(n: int, d: int, classes: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, d))
    return centres[labels] + spread * rng.normal(size=(n, d)), labels


def direct_log_evidence(features: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log p(y | F, alpha, beta) of Bayesian linear regression, written with the D x D matrix A (no SVD)."""
    n, d = features.shape
    a = alpha * np.eye(d) + beta * features.T @ features
    m = beta * np.linalg.solve(a, features.T @ y)
    return (0.5 * n * np.log(beta) + 0.5 * d * np.log(alpha) - 0.5 * n * np.log(2 * np.pi)
            - 0.5 * beta * ((features @ m - y) ** 2).sum() - 0.5 * alpha * m @ m - 0.5 * np.linalg.slogdet(a)[1])


def direct_logme(features: np.ndarray, labels: np.ndarray, log_beta_max: float = 30.0) -> list[float]:
    """The ICML'21 definition, per class: the evidence maximised over (alpha, beta) by a general optimiser
    (beta kept below exp(log_beta_max), where the D x D formula still has digits to spare)."""
    best = []
    for c in range(labels.max() + 1):
        y = (labels == c).astype(float)

        def negative(t, y=y):
            return -direct_log_evidence(features, y, np.exp(t[0]), np.exp(min(t[1], log_beta_max)))
        result = min((optimize.minimize(negative, start, method="Nelder-Mead",
                                        options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 6000})
                      for start in ([0.0, 0.0], [-3.0, 3.0], [3.0, -1.0], [6.0, 6.0])), key=lambda r: r.fun)
        best.append(-result.fun / len(y))
    return best


def low_rank(n: int, d: int, rank: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    return rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)), np.arange(n) % classes


@pytest.mark.parametrize("n, d, rank", [(24, 60, 8), (80, 12, 12)], ids=["N<D", "N>D"])
def test_logme_is_the_maximum_evidence(n, d, rank):
    # Features of rank below N: no one-hot column is fitted exactly, so the evidence peaks at a finite (alpha,
    # beta) that a general optimiser on the D x D formula finds too, also with D > N.
    features, labels = low_rank(n, d, rank, 3)
    assert logme(features, labels) == pytest.approx(np.mean(direct_logme(features, labels)), abs=1e-6)


def test_logme_with_full_rank_features_wider_than_the_data_takes_the_noise_free_limit_where_it_is_best():
    # N = 24 < D = 60, rank 24: every class column is fitted exactly, and for a class the evidence may grow
    # toward beta -> infinity, whose limit log N(y; 0, F F^T / alpha) maximised over alpha is closed-form.
    features, labels = clusters(24, 60, 3, spread=1.5)
    n = len(labels)
    u, s, _ = np.linalg.svd(features, full_matrices=False)
    per_class = []
    for c, bounded in enumerate(direct_logme(features, labels, log_beta_max=14.0)):
        z = u.T @ (labels == c)
        alpha = n / (z**2 / s**2).sum()
        limit = -0.5 * (n * np.log(2 * np.pi) + np.log(s**2 / alpha).sum() + n) / n
        per_class.append(max(bounded, limit))
    assert logme(features, labels) == pytest.approx(np.mean(per_class), abs=1e-6)


def test_logme_without_the_padded_eigenvalues_is_wrong_when_n_is_below_d():
    # The published fixed point sums log(alpha + beta s^2) over the N singular values only: with D = 60 > N = 24
    # its objective lacks 36 log(alpha) terms of log|A|. Maximised, that objective lands visibly away from the
    # evidence; the corrected score matches the evidence (above).
    features, labels = clusters(24, 60, 3, spread=1.5)
    n, d = features.shape
    unpadded = []
    for c in range(3):
        y = (labels == c).astype(float)
        with np.errstate(all="ignore"):  # the search visits overflowing corners
            result = optimize.minimize(lambda t, y=y: -(direct_log_evidence(features, y, *np.exp(t)) + 0.5 * (d - n) * t[0]),
                                       [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12})
        unpadded.append(-result.fun / n)
    assert abs(np.mean(unpadded) - logme(features, labels)) > 0.05


def test_a_better_separated_task_scores_higher_on_logme_hscore_sfda_and_knn():
    good, labels = clusters(60, 20, 3, spread=0.3)
    bad, _ = clusters(60, 20, 3, spread=3.0)
    for score in (logme, h_score, sfda, knn_loo):
        assert score(good, labels) > score(bad, labels), score.__name__


def test_leep_and_nce_equal_their_definitions_written_as_loops():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(40, 6))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 3, size=40)
    n, classes, sources = 40, 3, 6
    joint = np.zeros((classes, sources))
    for i in range(n):
        for z in range(sources):
            joint[labels[i], z] += probs[i, z] / n
    expected_leep = np.mean([np.log(sum(joint[labels[i], z] / joint[:, z].sum() * probs[i, z] for z in range(sources)))
                             for i in range(n)])
    assert leep(probs, labels) == pytest.approx(expected_leep, rel=1e-12)

    hard = np.zeros((classes, sources))
    for i in range(n):
        hard[labels[i], probs[i].argmax()] += 1 / n
    conditional_entropy = -sum(hard[y, z] * np.log(hard[y, z] / hard[:, z].sum())
                               for y in range(classes) for z in range(sources) if hard[y, z] > 0)
    assert nce(probs, labels) == pytest.approx(-conditional_entropy, rel=1e-12)
    assert nce(np.eye(3)[labels], labels) == pytest.approx(0.0)  # source classes that are the target classes


def test_h_score_equals_its_formula_plain_and_with_ledoit_wolf_shrinkage():
    features, labels = clusters(90, 8, 3, spread=1.0)
    centred = features - features.mean(0)
    class_means = np.stack([centred[labels == c].mean(0) for c in range(3)])[labels]  # E[f | y] per sample
    between = class_means.T @ class_means / len(labels)
    plain = np.trace(np.linalg.pinv(np.cov(centred.T, bias=True)) @ between)
    assert h_score(features, labels, shrink=False) == pytest.approx(plain, rel=1e-9)
    assert h_score(features, labels) == pytest.approx(shrunk_h_score(centred, between), rel=1e-9)
    # N < D (the Woodbury path): the plain inverse is meaningless, the shrunk one is not.
    wide, wide_labels = clusters(20, 64, 2, spread=1.0)
    centred = wide - wide.mean(0)
    class_means = np.stack([centred[wide_labels == c].mean(0) for c in range(2)])[wide_labels]
    assert h_score(wide, wide_labels) == pytest.approx(
        shrunk_h_score(centred, class_means.T @ class_means / len(wide_labels)), rel=1e-9)


def shrunk_h_score(centred: np.ndarray, between: np.ndarray) -> float:
    lw = LedoitWolf(assume_centered=True).fit(centred)
    return (1 - lw.shrinkage_) * np.trace(np.linalg.inv(lw.covariance_) @ between)


def test_knn_leave_one_out_equals_scikit_learn():
    features, labels = clusters(60, 10, 4, spread=1.2, seed=3)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    for k in (1, 5):
        expected = 100 * cross_val_score(KNeighborsClassifier(n_neighbors=k), unit, labels, cv=LeaveOneOut()).mean()
        assert knn_loo(features, labels, k=k) == pytest.approx(expected)


def test_knn_never_counts_a_bootstrap_copy_of_a_sample_as_its_neighbour():
    features, labels = clusters(30, 5, 3, spread=5.0)  # labels hardly predictable from the features
    rng = np.random.default_rng(0)
    labels = rng.permutation(labels)
    picked = np.concatenate([np.arange(30), np.arange(30)])  # every sample twice
    copies = knn_loo(features[picked], labels[picked], k=1)
    assert copies == 100.0  # each sample's nearest other is its copy ...
    assert knn_loo(features[picked], labels[picked], k=1, groups=picked) == knn_loo(features, labels, k=1)  # ... unless


@pytest.mark.parametrize("n, dim", [(50, 6), (12, 30)])  # N > D, and N < D (the N x N Woodbury solve)
def test_the_shrunk_within_class_solve_equals_the_direct_d_by_d_one(n, dim):
    rng = np.random.default_rng(1)
    spread, rhs = rng.normal(size=(n, dim)), rng.normal(size=(dim, 3))
    within = spread.T @ spread / n
    direct = np.linalg.solve(0.7 * within + 0.3 * np.trace(within) / dim * np.eye(dim), rhs)
    assert np.allclose(_shrunk_solve(spread, 0.3, rhs), direct, atol=1e-10)


def test_sfda_discriminant_is_the_papers_eigenvector_projection():
    dim = 6
    features, labels = clusters(50, dim, 3, spread=1.0)
    probs, shrinkage = _fisher_probs(features, labels, None)
    priors = np.bincount(labels) / len(labels)
    means = np.stack([features[labels == c].mean(0) for c in range(3)])
    within = sum(p * np.cov(features[labels == c].T, bias=True) for c, p in enumerate(priors))
    shrunk = (1 - shrinkage) * within + shrinkage * np.trace(within) / dim * np.eye(dim)
    total = np.cov(features.T, bias=True)
    shrunk_total = (1 - shrinkage) * total + shrinkage * np.trace(total) / dim * np.eye(dim)
    _, vectors = linalg.eigh(shrunk_total - shrunk, shrunk)  # the paper: generalised eigenvectors of (S_b, S_w)
    coef = means @ vectors @ vectors.T
    scores = features @ coef.T - 0.5 * np.diag(means @ coef.T) + np.log(priors)
    expected = np.exp(scores - scores.max(1, keepdims=True))
    assert np.allclose(probs, expected / expected.sum(1, keepdims=True), atol=1e-9)
    assert shrinkage == pytest.approx(max(np.exp(-5 * linalg.eigvalsh(within)[-1]), 1e-10))
    assert 0 < sfda(features, labels) <= 1
