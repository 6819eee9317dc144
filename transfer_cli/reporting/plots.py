"""Figures: learning curves per run and the confusion matrix of an evaluation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from transfer_cli.files import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)


def plot_curves(metrics: pd.DataFrame, path: Path) -> None:
    """Loss and top-1 accuracy per epoch, one line per split."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, column, label in ((axes[0], "loss", "loss"), (axes[1], "acc1", "top-1 accuracy (%)")):
        for split, rows in metrics.groupby("split", sort=False):
            if rows[column].isna().all():  # e.g. the label-free target_train rows
                continue
            if len(rows) > 1:
                ax.plot(rows["epoch"], rows[column], marker="o", ms=3, label=split)
            else:
                ax.scatter(rows["epoch"], rows[column], label=split, zorder=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    n = len(classes)
    side = min(max(4.0, 0.45 * n + 2), 24.0)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > threshold else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    _save(fig, path)


def plot_sweep(grouped: pd.DataFrame, keys: list[str], path: Path, metric: str = "test_acc1") -> None:
    """``metric`` against the first swept key, one line per value of the second, error bars over seeds."""
    x_key = keys[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    ticks = [str(v) for v in dict.fromkeys(grouped[x_key])]  # swept values, in sweep order
    lines = grouped.groupby(keys[1], sort=False) if len(keys) > 1 else [(None, grouped)]
    for value, rows in lines:
        label = f"{keys[1]}={value}" if value is not None else None
        x = [ticks.index(str(v)) for v in rows[x_key]]
        ax.errorbar(x, rows[f"{metric}_mean"], yerr=rows[f"{metric}_std"].fillna(0.0), marker="o", capsize=3,
                    label=label)
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend()
    _save(fig, path)


def plot_wise(table: pd.DataFrame, split: str, path: Path) -> None:
    """WiSE-FT: accuracy on validation and on ``split`` against the mixing coefficient alpha."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(table["alpha"], table["val_acc1"], marker="o", label="val")
    ax.plot(table["alpha"], table["acc1"], marker="s", label=split)
    chosen = table[table["chosen"]]
    ax.scatter(chosen["alpha"], chosen["acc1"], s=120, facecolors="none", edgecolors="black", zorder=3,
               label="chosen on val")
    ax.set_xlabel("alpha (0: first checkpoint, 1: second)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_features(embedding: np.ndarray, classes: np.ndarray, domains: np.ndarray, class_names: list[str],
                  domain_names: list[str], title: str, path: Path) -> None:
    """A 2-D embedding of features: colour = class, marker = domain (o: the first, x: the second)."""
    fig, ax = plt.subplots(figsize=(7, 6))
    colours = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for d, (name, marker) in enumerate(zip(domain_names, ("o", "x"), strict=False)):
        mine = domains == d
        ax.scatter(embedding[mine, 0], embedding[mine, 1], c=[colours(c % colours.N) for c in classes[mine]],
                   marker=marker, s=10 if marker == "o" else 14, linewidths=0.8, alpha=0.7, label=name)
    legend = ax.legend(title="domain", loc="upper right")
    for handle in legend.legend_handles:
        handle.set_color("black")
    ax.set_title(f"t-SNE of penultimate features, coloured by class ({title})")
    ax.set_xticks([])
    ax.set_yticks([])
    _save(fig, path)


def plot_lr_find(lrs: list[float], losses: list[float], suggestion: float, path: Path) -> None:
    """The learning-rate range test: smoothed loss against the rate (log scale), the chosen rate marked."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="tab:red", ls="--", label=f"chosen {suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_rank(table: pd.DataFrame, score: str, path: Path) -> None:
    """One bar per candidate for ``score`` with its bootstrap interval, best at the top; failed ones left out."""
    scored = table[table[score].notna()].sort_values(score)
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * max(len(scored), 2) + 1.2))
    if len(scored):
        low = (scored[score] - scored[f"{score}_low"]).clip(lower=0).fillna(0)
        high = (scored[f"{score}_high"] - scored[score]).clip(lower=0).fillna(0)
        ax.barh(scored["candidate"], scored[score], xerr=[low, high], color="tab:blue", alpha=0.8, capsize=3)
    ax.set_xlabel(f"{score} (bars: 95% bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def plot_explanations(images: np.ndarray, maps: np.ndarray, titles: list[str], path: Path,
                      compare: np.ndarray | None = None) -> None:
    """One row per sample: the image, then its attribution map over it (and a second model's, when given).
    ``images``: [N, H, W, 3] uint8; ``maps``: [N, H, W], each scaled to its own maximum."""
    columns = 2 if compare is None else 3
    fig, axes = plt.subplots(len(images), columns, figsize=(2.2 * columns, 2.2 * len(images)), squeeze=False)
    for row, (image, title) in enumerate(zip(images, titles, strict=True)):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(title, fontsize=7)
        for column, heat in enumerate([maps[row], *([] if compare is None else [compare[row]])], start=1):
            axes[row, column].imshow(overlay(image, heat))
        for ax in axes[row]:
            ax.axis("off")
    _save(fig, path)


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``heat`` (H, W, any scale) over ``image`` (H, W, 3 uint8) as an RGB float image in [0, 1]."""
    heat = heat / heat.max() if heat.max() > 0 else heat
    colour = matplotlib.colormaps["inferno"](heat)[..., :3]
    return 0.55 * image.astype(np.float64) / 255 + 0.45 * colour
