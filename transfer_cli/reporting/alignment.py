"""How well a model aligns two domains: a t-SNE picture of its penultimate features (colour: class, marker:
domain) and the proxy A-distance, 2 (1 - 2 err) of a linear classifier trained to tell the domains apart
from those features (Ben-David et al. 2007): near 2 when the domains are separable, near 0 (or below)
when they overlap."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from transfer_cli.engine.device import Precision
from transfer_cli.engine.loop import infer
from transfer_cli.engine.metrics import logit_metrics
from transfer_cli.reporting.plots import plot_features
from transfer_cli.reporting.tables import write_table


def proxy_a_distance(source: np.ndarray, target: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """(held-out error of a standardised logistic-regression domain classifier, proxy A-distance); the
    classifier learns on a stratified half of the samples and is scored on the other half."""
    x = np.concatenate([source, target])
    y = np.concatenate([np.zeros(len(source)), np.ones(len(target))])
    x_fit, x_test, y_fit, y_test = train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    error = 1.0 - classifier.fit(x_fit, y_fit).score(x_test, y_test)
    return float(error), float(2.0 * (1.0 - 2.0 * error))


def analyze_alignment(model: torch.nn.Module, source: tuple[str, Iterable], target: tuple[str, Iterable],
                      classes: list[str], device: torch.device, precision: Precision, out_dir: Path,
                      seed: int = 0) -> pd.DataFrame:
    """Features of ``model`` on a labelled (name, loader) of each domain -> ``features.png`` (t-SNE) and
    ``alignment.csv/.md`` (samples and top-1 per domain, domain-classifier error, proxy A-distance) in
    ``out_dir``; returns the table."""
    model = model.to(device).eval()
    features, labels, row = {}, {}, {"source": source[0], "target": target[0]}
    for role, (_name, loader) in (("source", source), ("target", target)):
        features[role], labels[role] = infer(model.features, loader, device, precision)
        with torch.inference_mode():
            logits = model.head(features[role].to(device)).float().cpu()
        row[f"{role}_samples"] = len(labels[role])
        row[f"{role}_acc1"] = logit_metrics(logits, labels[role])["acc1"]
    error, distance = proxy_a_distance(features["source"].numpy(), features["target"].numpy(), seed)
    table = pd.DataFrame([{**row, "domain_error": error, "proxy_a_distance": distance}])
    write_table(table, out_dir / "alignment.csv", markdown=True)
    points = torch.cat([features["source"], features["target"]]).numpy()
    perplexity = min(30.0, (len(points) - 1) / 3)
    embedding = TSNE(n_components=2, init="pca", learning_rate="auto", perplexity=perplexity,
                     random_state=seed).fit_transform(points)
    domains = np.repeat([0, 1], [len(labels["source"]), len(labels["target"])])
    plot_features(embedding, torch.cat([labels["source"], labels["target"]]).numpy(), domains, classes,
                  [f"source: {source[0]}", f"target: {target[0]}"], f"proxy A-distance {distance:.2f}",
                  out_dir / "features.png")
    return table
