"""`transfer eval`: rebuild models from checkpoint sidecars and measure them (or their ensemble) on a split."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from transfer_cli.config import DatasetConfig
from transfer_cli.data.decoded import hold_in_memory
from transfer_cli.engine.device import Precision, resolve_device
from transfer_cli.engine.loop import infer
from transfer_cli.engine.metrics import logit_metrics
from transfer_cli.errors import UserError, bad_value
from transfer_cli.models.backbone import Classifier
from transfer_cli.models.checkpoint import load_model
from transfer_cli.models.recipe import ModelRecipe
from transfer_cli.pipeline import build_data, make_loader
from transfer_cli.registry import Registry
from transfer_cli.reporting.plots import plot_confusion
from transfer_cli.reporting.tables import rich_table, write_table

SPLITS = ("train", "val", "test")
# name -> fuse(member log-probabilities [M, N, C], weights or None) -> ensemble log-probabilities [N, C]
FUSIONS = Registry("ensemble")


@dataclass
class Member:
    path: str
    model: Classifier
    meta: dict[str, Any]

    @property
    def recipe(self) -> ModelRecipe:
        return self.model.recipe


def load_member(path: str) -> Member:
    model, meta = load_model(path)
    return Member(path, model, meta)


def _dataset_config(cfg: DictConfig, meta: dict[str, Any], path: str) -> DatasetConfig:
    if cfg.dataset is not None:
        return OmegaConf.to_object(cfg.dataset)
    stored = meta.get("config", {}).get("dataset") if isinstance(meta.get("config"), dict) else None
    if not isinstance(stored, dict):
        raise UserError(f"checkpoint={path!r}: its sidecar does not record the dataset it was trained on; "
                        "pass dataset=NAME (and dataset.root=...) to say what to evaluate on.")
    schema = OmegaConf.structured(DatasetConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, stored))


@FUSIONS.register("mean")
def mean_probability(log_probs: torch.Tensor, weights: list[float] | None = None) -> torch.Tensor:
    """Average of the members' softmax probabilities."""
    return log_probs.exp().mean(0).log()


@FUSIONS.register("weighted")
def weighted_probability(log_probs: torch.Tensor, weights: list[float] | None = None) -> torch.Tensor:
    """Weighted average of softmax probabilities; weights are non-negative and normalised to sum 1."""
    w = torch.tensor(weights, dtype=torch.float)
    return (log_probs.exp() * (w / w.sum()).view(-1, 1, 1)).sum(0).log()


@FUSIONS.register("vote")
def majority_vote(log_probs: torch.Tensor, weights: list[float] | None = None) -> torch.Tensor:
    """Majority of top-1 predictions; ties go to the higher mean probability."""
    probs = log_probs.exp()
    votes = torch.nn.functional.one_hot(probs.argmax(2), probs.shape[2]).float().mean(0)
    return (votes + 1e-6 * probs.mean(0)).log()


def _scores(log_probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, float]:
    truth, predicted = labels.numpy(), log_probs.argmax(1).numpy()
    macro = f1_score(truth, predicted, labels=np.arange(len(classes)), average="macro", zero_division=0)
    return {**logit_metrics(log_probs, labels), "macro_f1": 100.0 * macro, "n": len(truth)}


def check_ensemble(cfg: DictConfig, count: int) -> list[float] | None:
    """The member weights as floats, after checking that the fusion rule exists and, for ``weighted``, that
    there is one non-negative weight per member with a positive sum."""
    FUSIONS.get(cfg.ensemble.name)
    weights = None if cfg.ensemble.weights is None else [float(w) for w in cfg.ensemble.weights]
    if cfg.ensemble.name != "weighted" or count < 2:
        return weights
    if weights is None or len(weights) != count:
        raise UserError(f"ensemble=weighted needs ensemble.weights with one weight per checkpoint "
                        f"({count}), got {weights}.")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"ensemble.weights={weights} is not allowed: weights must be finite and >= 0 with a "
                        "positive sum (they are normalised to sum 1).")
    return weights


def _check_members(members: list[Member]) -> None:
    classes = members[0].recipe.classes
    for m in members[1:]:
        if m.recipe.classes != classes:
            raise UserError(f"checkpoint={m.path!r} predicts classes {m.recipe.classes[:10]}, but "
                            f"{members[0].path!r} predicts {classes[:10]}: ensemble members must share classes "
                            "(same names, same order).")


def class_order(model_classes: list[str], data_classes: list[str], dataset: str, path: str) -> list[int] | None:
    """None when the dataset labels classes exactly as the model does; the model-output index of each
    dataset class when the names are the same set in another order; otherwise a UserError: scoring a model
    on classes it was not trained for gives a number that means nothing."""
    if model_classes == data_classes:
        return None
    if sorted(model_classes) == sorted(data_classes):
        return [model_classes.index(name) for name in data_classes]
    raise UserError(
        f"dataset={dataset} has the classes {', '.join(data_classes[:10])}{' ...' if len(data_classes) > 10 else ''} "
        f"but checkpoint={path!r} predicts {', '.join(model_classes[:10])}{' ...' if len(model_classes) > 10 else ''}. "
        "Evaluate on data with the same class names (e.g. the dataset.classes the model was trained with)."
    )


def run_eval(cfg: DictConfig, out_dir: Path, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    if cfg.split not in SPLITS:
        raise bad_value("split", cfg.split, SPLITS)
    paths = [str(cfg.checkpoint)] if isinstance(cfg.checkpoint, str) else [str(p) for p in cfg.checkpoint]
    weights = check_ensemble(cfg, len(paths))
    members = [load_member(p) for p in paths]
    _check_members(members)
    data_cfg = _dataset_config(cfg, members[0].meta, paths[0])
    splits = build_data(data_cfg)
    order = class_order(members[0].recipe.classes, splits.classes, data_cfg.name, paths[0])
    if order is not None:
        console.print("the dataset lists the model's classes in another order: predictions are matched by name.")
    classes = splits.classes  # from here on, columns follow the dataset's labels
    device = resolve_device(cfg.device)
    precision = Precision(str(cfg.precision), device)

    log_probs, rows = [], []
    for member in members:  # each member sees the data through its own preprocessing
        held = hold_in_memory(splits, member.model.spec, data_cfg, lambda message: console.print(message, highlight=False, soft_wrap=True))
        loader = make_loader(held.split(cfg.split), member.model.spec, data_cfg, False, device,
                             batch_size=cfg.batch_size)
        logits, labels = infer(member.model.to(device).eval(), loader, device, precision)
        if order is not None:
            logits = logits[:, order]
        log_probs.append(logits.log_softmax(1))
        rows.append({"model": member.path, "backbone": member.recipe.backbone, **_scores(log_probs[-1], labels, classes)})
    if len(members) > 1:
        fused = FUSIONS.get(cfg.ensemble.name)(torch.stack(log_probs), weights)
        scores = _scores(fused, labels, classes)
        if cfg.ensemble.name == "vote":
            scores["loss"] = float("nan")  # votes are not probabilities
        rows.append({"model": f"ensemble ({cfg.ensemble.name})", "backbone": "+".join(m.recipe.backbone for m in members),
                     **scores})
    final = log_probs[0] if len(members) == 1 else fused

    predicted, truth = final.argmax(1).numpy(), labels.numpy()
    every = np.arange(len(classes))
    precision_, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=every, zero_division=0)
    per_class = pd.DataFrame({"class": classes, "precision": 100 * precision_, "recall": 100 * recall,
                              "f1": 100 * f1, "support": support})
    matrix = confusion_matrix(truth, predicted, labels=every)
    confusion = pd.DataFrame(matrix, columns=classes)
    confusion.insert(0, "true", classes)

    table = pd.DataFrame(rows)
    table.insert(2, "dataset", data_cfg.name)
    table.insert(3, "split", cfg.split)
    write_table(table, out_dir / "eval.csv")
    write_table(per_class, out_dir / "per_class.csv")
    write_table(confusion, out_dir / "confusion.csv")
    plot_confusion(matrix, classes, out_dir / "confusion.png")
    # a checkpoint is shown by its run folder (<name>/<time>), the ensemble by its fusion rule
    shown = table.assign(model=["/".join(Path(m).parts[-4:-2]) if m.endswith(".safetensors") else m
                                for m in table["model"]])
    console.print(rich_table(shown.drop(columns=["dataset"]), title=f"eval on {data_cfg.name} {cfg.split}"))
    console.print(rich_table(per_class, title="per class" + (" (ensemble)" if len(members) > 1 else "")))
    if len(classes) <= 20:
        console.print(rich_table(confusion, title="confusion (rows: true, columns: predicted)"))
    console.print(f"written to {out_dir}")
    return rows[-1]
