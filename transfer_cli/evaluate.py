"""`transfer eval`: rebuild models from checkpoint sidecars and measure them (or their ensemble) on a split."""

from __future__ import annotations

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
from transfer_cli.engine.checkpoint import load_model_state, read_checkpoint
from transfer_cli.engine.device import Precision, resolve_device
from transfer_cli.engine.loop import predict
from transfer_cli.engine.metrics import logit_metrics
from transfer_cli.errors import UserError, bad_value
from transfer_cli.methods.base import Method
from transfer_cli.models.backbone import Classifier
from transfer_cli.pipeline import build_data, make_loader, rebuild_model
from transfer_cli.reporting.plots import plot_confusion
from transfer_cli.reporting.tables import rich_table, write_table

SPLITS = ("train", "val", "test")
FUSIONS = ("mean", "weighted", "vote")


@dataclass
class Member:
    path: str
    model: Classifier
    meta: dict[str, Any]


def load_member(path: str) -> Member:
    state, meta = read_checkpoint(path)
    model = rebuild_model(meta)
    load_model_state(model, state, path)
    return Member(path, model, meta)


def _dataset_config(cfg: DictConfig, meta: dict[str, Any]) -> DatasetConfig:
    if cfg.dataset is not None:
        return OmegaConf.to_object(cfg.dataset)
    schema = OmegaConf.structured(DatasetConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, meta["config"]["dataset"]))


def fuse(log_probs: list[torch.Tensor], how: str, weights: list[float] | None) -> torch.Tensor:
    """Log-probabilities of the ensemble prediction."""
    probs = torch.stack([lp.exp() for lp in log_probs])
    if how == "vote":
        votes = torch.nn.functional.one_hot(probs.argmax(2), probs.shape[2]).float().mean(0)
        return (votes + 1e-6 * probs.mean(0)).log()  # ties go to the higher mean probability
    w = torch.ones(len(log_probs)) if how == "mean" else torch.tensor(weights, dtype=torch.float)
    return (probs * (w / w.sum()).view(-1, 1, 1)).sum(0).log()


def _scores(log_probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, float]:
    truth, predicted = labels.numpy(), log_probs.argmax(1).numpy()
    macro = f1_score(truth, predicted, labels=np.arange(len(classes)), average="macro", zero_division=0)
    return {**logit_metrics(log_probs, labels), "macro_f1": 100.0 * macro, "n": len(truth)}


def _check_members(members: list[Member], cfg: DictConfig) -> None:
    classes = members[0].meta["classes"]
    for m in members[1:]:
        if m.meta["classes"] != classes:
            raise UserError(f"checkpoint={m.path!r} predicts classes {m.meta['classes'][:10]}, but "
                            f"{members[0].path!r} predicts {classes[:10]}: ensemble members must share classes.")
    if len(members) > 1:
        if cfg.ensemble.name not in FUSIONS:
            raise bad_value("ensemble", cfg.ensemble.name, FUSIONS)
        weights = cfg.ensemble.weights
        if cfg.ensemble.name == "weighted" and (weights is None or len(weights) != len(members)):
            raise UserError(f"ensemble=weighted needs ensemble.weights with one weight per checkpoint "
                            f"({len(members)}), got {None if weights is None else list(weights)}.")


def run_eval(cfg: DictConfig, out_dir: Path, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    if cfg.split not in SPLITS:
        raise bad_value("split", cfg.split, SPLITS)
    paths = [str(cfg.checkpoint)] if isinstance(cfg.checkpoint, str) else [str(p) for p in cfg.checkpoint]
    members = [load_member(p) for p in paths]
    _check_members(members, cfg)
    classes = members[0].meta["classes"]
    data_cfg = _dataset_config(cfg, members[0].meta)
    splits = build_data(data_cfg)
    if len(splits.classes) != len(classes):
        raise UserError(
            f"dataset={data_cfg.name} has {len(splits.classes)} classes but checkpoint={paths[0]!r} "
            f"predicts {len(classes)} ({', '.join(classes[:10])}). Evaluate on a dataset with the same classes."
        )
    device = resolve_device(cfg.device)
    precision = Precision(str(cfg.precision), device)
    dataset = splits.split(cfg.split)

    log_probs, rows = [], []
    for member in members:  # each member sees the data through its own preprocessing
        loader = make_loader(dataset, splits, member.model.spec, data_cfg, False, device, batch_size=cfg.batch_size)
        logits, labels = predict(Method(member.model).to(device), loader, device, precision)
        log_probs.append(logits.log_softmax(1))
        rows.append({"model": member.path, "backbone": member.meta["backbone"], **_scores(log_probs[-1], labels, classes)})
    if len(members) > 1:
        fused = fuse(log_probs, cfg.ensemble.name, cfg.ensemble.weights)
        scores = _scores(fused, labels, classes)
        if cfg.ensemble.name == "vote":
            scores["loss"] = float("nan")  # votes are not probabilities
        rows.append({"model": f"ensemble ({cfg.ensemble.name})", "backbone": "+".join(m.meta["backbone"] for m in members),
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
