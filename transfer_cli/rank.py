"""`transfer rank`: score candidate backbones on the user's labelled data before training any of them.

One forward pass per candidate over the train split (its own preprocessing, through the feature cache the
linear probe uses), then every score of transferability.py on those features, bootstrap intervals, and the
recommended candidate. A candidate that fails to build or load is a row with its error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console

from transfer_cli import transferability as scores
from transfer_cli.config import BackboneConfig, DatasetConfig, HeadConfig
from transfer_cli.data.identity import input_identities
from transfer_cli.data.splits import DataSplits, targets_of
from transfer_cli.engine.device import Precision, resolve_device, seed_stage, stage_seed
from transfer_cli.errors import UserError, bad_value
from transfer_cli.methods.feature_cache import cached_features, weights_digest
from transfer_cli.methods.probe_scratch import L2_GRID, head_lbfgs, lbfgs_head_step
from transfer_cli.models.backbone import BACKBONES, Classifier, takes_text
from transfer_cli.pipeline import build_data, build_model, make_loader, prepare_splits
from transfer_cli.rank_validation import check_validate, validate_ranking
from transfer_cli.reporting.plots import plot_rank
from transfer_cli.reporting.progress import plain_log
from transfer_cli.reporting.tables import rich_table, write_table
from transfer_cli.scoring import check_weights_unseen
from transfer_cli.source import source_model
from transfer_cli.validation import check_dataset, check_source

SOURCE_SCORES = ("leep", "nce")  # need the classifier the candidate came with
NO_INTERVAL = ("probe", "size")  # the probe is fitted 14 times per draw; the size does not depend on the data
SCORES = ("logme", "leep", "nce", "hscore", "sfda", "knn", "probe", "size")
# By mean weighted tau against the linear probe's test accuracy on bench/rank.py's 17 candidates x 18 settings
# (probe 0.80, logme 0.75, knn 0.69, sfda 0.62, nce 0.56, hscore 0.34, leep 0.30, size -0.23); the probe also
# had the lowest top-1 regret (0.56 points against LogME's 1.16) and ordered fine-tuning best (0.40 vs 0.29).
MEASURED_ORDER = ("probe", "logme", "knn", "sfda", "nce", "hscore", "leep", "size")


@dataclass
class Features:
    """What one candidate's forward pass gives the scores."""

    features: np.ndarray  # [N, D] float64
    labels: np.ndarray  # [N]
    source_probs: np.ndarray | None  # [N, Z]: the candidate's own (pretrained) classifier's probabilities
    params: int
    model: Classifier


def run_rank(cfg: DictConfig, out_dir: Path, console: Console | None = None) -> pd.DataFrame:
    console = console or Console()
    log = plain_log(console)
    candidates = _candidates(cfg)
    chosen, recommend = _check_scores(cfg)
    to_train = check_validate(cfg)
    data_cfg: DatasetConfig = OmegaConf.to_object(cfg.dataset)
    check_dataset(data_cfg)
    splits = build_data(data_cfg)
    _check_labels(splits, data_cfg)
    _check_kinds(candidates, splits, data_cfg)
    device = resolve_device(cfg.device)
    precision = Precision(str(cfg.precision), device)
    rows = []
    for i, candidate in enumerate(candidates):
        label = _label(candidate)
        log(f"[{i + 1}/{len(candidates)}] {label}")
        started = time.perf_counter()
        try:  # a candidate that trained on these samples would score its own training labels
            if candidate.weights == "source":  # from here on the candidate is the source model's file
                candidates[i] = candidate = _source_candidate(cfg, candidate, device, precision, console)
            check_weights_unseen(candidate.weights, data_cfg, splits, ("train",), f"candidates[{i}].weights")
            got = _features(cfg, candidate, data_cfg, splits, device, precision, log)
            row = _score(got, chosen, cfg)
            row.update(feature_dim=got.features.shape[1], params=got.params, error="")
        except (UserError, OmegaConfBaseException, OSError, RuntimeError, ValueError, KeyError) as err:
            row = {"error": " ".join(str(err).split())}
        rows.append({"candidate": label, "backbone": candidate.name, "weights": candidate.weights, "cut": candidate.cut,
                     **row,
                     "seconds": round(time.perf_counter() - started, 2)})
    table = _ranked(rows, chosen)
    write_table(table, out_dir / "rank.csv")
    plot_rank(table, recommend, out_dir / "rank.png")
    _announce(table, recommend, candidates, data_cfg.name, out_dir, console)
    if to_train != 0:
        validate_ranking(cfg, table, candidates, recommend, to_train, out_dir, console)
        write_table(table, out_dir / "rank.csv")  # now with each trained candidate's measured_acc1
    return table


def _candidates(cfg: DictConfig) -> list[DictConfig]:
    """Each candidate as a backbone config (the keys backbone= takes); a candidate whose keys are wrong is
    refused here, before any work (a typo would otherwise rank a different model)."""
    if not isinstance(cfg.candidates, ListConfig) or len(cfg.candidates) == 0:
        raise bad_value("candidates", OmegaConf.to_container(cfg.candidates) if isinstance(cfg.candidates, DictConfig)
                        else cfg.candidates, "a non-empty list of backbones: [small_cnn, {name: resnet18, weights: "
                        "DEFAULT}, ...] (each what backbone= takes)")
    out = []
    for i, item in enumerate(cfg.candidates):
        entry = {"name": item} if isinstance(item, str) else item
        try:
            out.append(OmegaConf.merge(OmegaConf.structured(BackboneConfig), entry))
        except OmegaConfBaseException as err:
            raise UserError(f"candidates[{i}]={OmegaConf.to_container(item) if not isinstance(item, str) else item}: "
                            f"{str(err).splitlines()[0]}. A candidate takes the keys of backbone= "
                            f"({', '.join(BackboneConfig.__dataclass_fields__)}).") from None
        if out[-1].weights == "source":
            if cfg.source is None:
                raise UserError(f"candidates[{i}] weights=source needs the source task to pretrain on: source=NAME "
                                "(conf/source/, e.g. source=digits_0to4), as for `transfer train backbone.weights=source`.")
            check_source(cfg.source)
    return out


def _source_candidate(cfg: DictConfig, candidate: DictConfig, device: torch.device, precision: Precision,
                      console: Console) -> DictConfig:
    """``candidate`` with weights=source replaced by the source model's checkpoint (pretrained on ``cfg.source``,
    or read from the cache `transfer train backbone.weights=source` shares); its head is the source classifier."""
    source = OmegaConf.to_container(cfg.source, resolve=True)
    run = OmegaConf.create({"source": source, "backbone": {"name": candidate.name}, "trainer": {"progress": "none"}})
    made = source_model(run, build_data(run.source.dataset), device, precision, console)
    return OmegaConf.merge(candidate, {"weights": str(made.path.resolve())})


def _check_scores(cfg: DictConfig) -> tuple[list[str], str]:
    """(the scores to compute, the one that recommends)."""
    chosen = list(cfg.scores)
    unknown = [s for s in chosen if s not in SCORES]
    if unknown or not chosen:
        raise bad_value("scores", chosen, f"a non-empty list of {', '.join(SCORES)}")
    recommend = next(s for s in MEASURED_ORDER if s in chosen) if cfg.recommend == "auto" else cfg.recommend
    if recommend not in chosen:
        raise bad_value("recommend", cfg.recommend, f"auto or one of the scores computed ({', '.join(chosen)})")
    if cfg.bootstrap < 0:
        raise bad_value("bootstrap", cfg.bootstrap, "an integer >= 0 (0: no intervals)")
    if cfg.knn_k < 1:
        raise bad_value("knn_k", cfg.knn_k, "an integer >= 1")
    return chosen, recommend


def _check_labels(splits: DataSplits, data_cfg: DatasetConfig) -> None:
    counts = np.bincount(targets_of(splits.train), minlength=len(splits.classes))
    if counts.min() < 2:
        few = [splits.classes[c] for c in np.flatnonzero(counts < 2)[:5]]
        raise UserError(f"dataset={data_cfg.name} (dataset.shots={data_cfg.shots}) has fewer than 2 labelled training "
                        f"samples of class(es) {', '.join(map(str, few))}: every score compares samples within a class. "
                        "Use more shots (dataset.shots >= 2) or a larger dataset.fraction.")


def _check_kinds(candidates: list[DictConfig], splits: DataSplits, data_cfg: DatasetConfig) -> None:
    for i, candidate in enumerate(candidates):
        if candidate.name in BACKBONES.names() and takes_text(candidate.name) != splits.text:
            kind = "text" if takes_text(candidate.name) else "images"
            raise UserError(f"candidates[{i}] name={candidate.name} takes {kind} but dataset={data_cfg.name} holds "
                            f"{splits.kind}: rank candidates of one kind.")


def _label(candidate: DictConfig) -> str:
    weights = Path(candidate.weights).name if "/" in candidate.weights else candidate.weights
    return f"{candidate.name} ({weights}{f', cut {candidate.cut}' if candidate.cut else ''})"


def _features(cfg: DictConfig, candidate: DictConfig, data_cfg: DatasetConfig, splits: DataSplits,
              device: torch.device, precision: Precision, log: Callable[[str], None]) -> Features:
    seed_stage(cfg.seed, "init")  # a random-init candidate is the same whatever was ranked before it
    model = build_model(SimpleNamespace(dataset=data_cfg, backbone=candidate, head=HeadConfig()), splits).to(device)
    prepared = prepare_splits(splits, model.spec, data_cfg, log)
    loader = make_loader(prepared.train, model.spec, data_cfg, False, device)
    identity = input_identities(prepared, model.spec)["train"]
    cache_dir = Path(cfg.cache_dir) if cfg.cache else None
    features, labels = cached_features(model, loader, "train", identity, cache_dir, device, precision,
                                       weights_digest(model))
    source_probs = None
    if model.source_head and candidate.weights != "none":
        head = model.source_head[0].to(device)
        with torch.no_grad():
            source_probs = torch.softmax(head(features.to(device).float()), 1).double().cpu().numpy()
    params = sum(p.numel() for p in model.body.parameters())
    # The quick probe's L-BFGS fits are thousands of tiny synchronous steps: about a second on the CPU, while on
    # a GPU each one waits for a kernel launch. On the CPU the probe also scores the same on every machine.
    return Features(features.double().numpy(), labels.numpy(), source_probs, params, model.cpu())


def _score(got: Features, chosen: list[str], cfg: DictConfig) -> dict[str, Any]:
    row: dict[str, Any] = {}
    draws = _bootstrap_draws(got.labels, cfg.bootstrap, cfg.seed)
    for name in chosen:
        if name in SOURCE_SCORES and got.source_probs is None:
            row[name] = row[f"{name}_low"] = row[f"{name}_high"] = float("nan")
            continue
        compute = _scorer(name, got, cfg)
        row[name] = compute(np.arange(len(got.labels)))
        values = [compute(idx) for idx in draws] if name not in NO_INTERVAL else []
        row[f"{name}_low"], row[f"{name}_high"] = shifted_interval(row[name], values)
    return row


def shifted_interval(estimate: float, resampled: list[float]) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the resampled scores, shifted by their bias (their mean minus the
    estimate). A resample repeats samples, which makes most scores look better than on distinct data (LogME by
    ~0.05 on digits, every resample above the estimate): the plain percentile interval would miss the estimate
    itself; the shifted one keeps the resamples' spread around it."""
    if not resampled:
        return float("nan"), float("nan")
    bias = float(np.mean(resampled)) - estimate
    low, high = np.percentile(resampled, [2.5, 97.5])
    return float(low - bias), float(high - bias)


def _scorer(name: str, got: Features, cfg: DictConfig) -> Callable[[np.ndarray], float]:
    x, y, probs = got.features, got.labels, got.source_probs
    return {
        "logme": lambda idx: scores.logme(x[idx], y[idx]),
        "leep": lambda idx: scores.leep(probs[idx], y[idx]),
        "nce": lambda idx: scores.nce(probs[idx], y[idx]),
        "hscore": lambda idx: scores.h_score(x[idx], y[idx]),
        "sfda": lambda idx: scores.sfda(x[idx], y[idx]),
        "knn": lambda idx: scores.knn_loo(x[idx], y[idx], cfg.knn_k, groups=idx),
        "probe": lambda idx: quick_probe(got.model, x[idx], y[idx], cfg.seed),
        "size": lambda idx: float(got.params),
    }[name]


def _bootstrap_draws(labels: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    """Resamples with replacement within each class (every class keeps its count, so no score loses a class)."""
    rng = np.random.default_rng(stage_seed(seed, "rank.bootstrap"))
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return [np.sort(np.concatenate([rng.choice(m, len(m)) for m in members])) for _ in range(count)]


def quick_probe(model: Classifier, features: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """Two-fold cross-validated top-1 (percent) of the L-BFGS linear probe on the train features, at the L2
    strength of L2_GRID that does best across the folds: the probe without touching val or test."""
    rng = np.random.default_rng(stage_seed(seed, "rank.probe"))
    fold = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members[: len(members) // 2]] = True
    device = next(model.head.parameters()).device
    x = torch.as_tensor(features, dtype=torch.float32, device=device)
    y = torch.as_tensor(labels, device=device)
    initial = {k: v.clone() for k, v in model.head.state_dict().items()}
    best = 0.0
    for l2 in L2_GRID:
        correct = 0
        for train in (fold, ~fold):
            model.head.load_state_dict(initial)
            lbfgs_head_step(head_lbfgs(model, 100), model, x[train], y[train], l2)
            with torch.no_grad():
                correct += int((model.head(x[~train]).argmax(1) == y[~train]).sum())
        best = max(best, 100 * correct / len(labels))
    model.head.load_state_dict(initial)
    return best


def _ranked(rows: list[dict[str, Any]], chosen: list[str]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    for name in chosen:
        if name not in table:
            table[name] = np.nan
        table[f"{name}_rank"] = table[name].rank(ascending=False, method="min").astype("Int64")
    ordered = ["candidate", "backbone", "weights", "cut", "feature_dim", "params", "seconds"]
    for name in chosen:
        ordered += [name, f"{name}_low", f"{name}_high", f"{name}_rank"]
    return table.reindex(columns=[*ordered, "error"])


def train_overrides(candidate: DictConfig) -> list[str]:
    """The `transfer train` overrides that make ``candidate`` the run's backbone: its name and every key that
    differs from backbone='s defaults (weights, cut, preprocessing ...)."""
    def leaves(tree: Any, prefix: str) -> dict[str, Any]:
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{prefix}.{key}").items()}
        return {prefix: tree}

    default = leaves(OmegaConf.to_container(OmegaConf.structured(BackboneConfig)), "backbone")
    own = leaves(OmegaConf.to_container(candidate), "backbone")
    return [f"{key}={_override_value(value)}" for key, value in own.items()
            if key == "backbone.name" or value != default.get(key)]


def _override_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    text = str(value)
    return f"'{text}'" if isinstance(value, str) and any(c in text for c in "/ ,=:'[]{}") else text


def _announce(table: pd.DataFrame, recommend: str, candidates: list[DictConfig], dataset: str, out_dir: Path,
              console: Console) -> None:
    shown = table[[c for c in table.columns if not c.endswith(("_low", "_high", "_rank"))
                   and c not in ("backbone", "weights", "cut", "params")]].copy()
    shown["error"] = shown["error"].fillna("").str.slice(0, 60)
    ranked = table[recommend].notna()
    best = int(table.loc[ranked, recommend].idxmax()) if ranked.any() else None
    console.print(rich_table(shown, title=f"rank -> {out_dir}/rank.csv", highlight=[best] if best is not None else []))
    if best is None:
        raise UserError(f"no candidate could be scored by {recommend}: every row of {out_dir}/rank.csv holds its error.")
    overrides = train_overrides(candidates[best])
    (out_dir / "recommended.json").write_text(json.dumps(
        {"score": recommend, "candidate": table.loc[best, "candidate"], "train_overrides": overrides}, indent=1))
    console.print(f"recommended: {table.loc[best, 'candidate']} (best {recommend}); train it with\n"
                  f"  transfer train dataset={dataset} <the same dataset.* overrides> {' '.join(overrides)}",
                  highlight=False, soft_wrap=True)
