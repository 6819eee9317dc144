"""`transfer eval`: rebuild a model from its checkpoint sidecar and measure it on a split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
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
from transfer_cli.pipeline import build_data, make_loader, rebuild_model
from transfer_cli.reporting.plots import plot_confusion
from transfer_cli.reporting.tables import rich_table, write_table

SPLITS = ("train", "val", "test")


def _dataset_config(cfg: DictConfig, meta: dict[str, Any]) -> DatasetConfig:
    if cfg.dataset is not None:
        return OmegaConf.to_object(cfg.dataset)
    schema = OmegaConf.structured(DatasetConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, meta["config"]["dataset"]))


def run_eval(cfg: DictConfig, out_dir: Path, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    if cfg.split not in SPLITS:
        raise bad_value("split", cfg.split, SPLITS)
    state, meta = read_checkpoint(cfg.checkpoint)
    model = rebuild_model(meta)
    spec = model.spec
    load_model_state(model, state, cfg.checkpoint)
    data_cfg = _dataset_config(cfg, meta)
    splits = build_data(data_cfg)
    if len(splits.classes) != meta["num_classes"]:
        raise UserError(
            f"dataset={data_cfg.name} has {len(splits.classes)} classes but checkpoint={cfg.checkpoint!r} "
            f"predicts {meta['num_classes']} ({', '.join(meta['classes'][:10])}). Evaluate on a dataset with "
            "the same classes."
        )
    device = resolve_device(cfg.device)
    precision = Precision(str(cfg.precision), device)
    method = Method(model).to(device)
    loader = make_loader(splits.split(cfg.split), splits, spec, data_cfg, False, device, batch_size=cfg.batch_size)
    logits, labels = predict(method, loader, device, precision)

    classes = meta["classes"]
    predicted = logits.argmax(1).numpy()
    truth = labels.numpy()
    every = np.arange(len(classes))
    overall = {
        "checkpoint": cfg.checkpoint,
        "dataset": data_cfg.name,
        "split": cfg.split,
        **logit_metrics(logits, labels),
        "macro_f1": 100.0 * f1_score(truth, predicted, labels=every, average="macro", zero_division=0),
        "n": len(truth),
    }
    precision_, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=every, zero_division=0)
    per_class = pd.DataFrame({"class": classes, "precision": 100 * precision_, "recall": 100 * recall,
                              "f1": 100 * f1, "support": support})
    matrix = confusion_matrix(truth, predicted, labels=every)
    confusion = pd.DataFrame(matrix, columns=classes)
    confusion.insert(0, "true", classes)

    eval_table = pd.DataFrame([overall])
    write_table(eval_table, out_dir / "eval.csv")
    write_table(per_class, out_dir / "per_class.csv")
    write_table(confusion, out_dir / "confusion.csv")
    plot_confusion(matrix, classes, out_dir / "confusion.png")
    console.print(rich_table(eval_table.drop(columns=["checkpoint"]), title=f"eval: {cfg.checkpoint}"))
    console.print(rich_table(per_class, title="per class"))
    if len(classes) <= 20:
        console.print(rich_table(confusion, title="confusion (rows: true, columns: predicted)"))
    console.print(f"written to {out_dir}")
    return overall
