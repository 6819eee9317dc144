"""`transfer analyze`: how a checkpoint's features align its source and target domains (see
reporting/alignment.py): features.png and alignment.csv."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from transfer_cli.config import SPLITS, DatasetConfig
from transfer_cli.engine.device import Precision, resolve_device
from transfer_cli.errors import UserError, bad_value
from transfer_cli.pipeline import build_data, prepare_splits, sample_loader
from transfer_cli.reporting.alignment import analyze_alignment
from transfer_cli.reporting.progress import plain_log
from transfer_cli.reporting.tables import rich_table
from transfer_cli.scoring import Member, open_checkpoints, stored_dataset
from transfer_cli.validation import check_dataset


def run_analyze(cfg: DictConfig, out_dir: Path, console: Console | None = None) -> pd.DataFrame:
    console = console or Console()
    if cfg.split not in SPLITS:
        raise bad_value("split", cfg.split, SPLITS)
    if cfg.samples < 10:
        raise bad_value("samples", cfg.samples, "an integer >= 10 (images per domain)")

    log = plain_log(console)

    opened = open_checkpoints([str(cfg.checkpoint)], {cfg.split}, cfg.dataset, cfg.dataset_changes, log)
    member = opened.members[0]
    model = member.model
    target_cfg = _target_config(cfg, member)
    target = prepare_splits(build_data(target_cfg), model.spec, target_cfg, log)
    if len(target.classes) != len(model.recipe.classes):
        raise UserError(f"target dataset={target_cfg.name} has {len(target.classes)} classes but checkpoint="
                        f"{cfg.checkpoint!r} predicts {len(model.recipe.classes)}: both domains must share "
                        "the model's classes.")
    if len(target.split(cfg.split)) == 0:
        raise UserError(f"target dataset={target_cfg.name} has no {cfg.split} samples: choose split=train|val|test.")
    device = resolve_device(cfg.device)
    precision = Precision(str(cfg.precision), device)
    source = prepare_splits(opened.splits, model.spec, opened.data, log)
    loaders = [(data_cfg.name, sample_loader(splits.split(cfg.split), model.spec, data_cfg, device, cfg.samples, cfg.seed))
               for data_cfg, splits in ((opened.data, source), (target_cfg, target))]
    table = analyze_alignment(model, *loaders, list(model.recipe.classes), device, precision, out_dir, cfg.seed)
    console.print(rich_table(table, title=f"alignment of {cfg.checkpoint} -> {out_dir}/features.png"))
    return table


def _target_config(cfg: DictConfig, member: Member) -> DatasetConfig:
    if cfg.target is not None:
        target = OmegaConf.to_object(cfg.target.dataset)
        check_dataset(target)
        return target
    stored = member.trained("target", "dataset")
    if not stored:
        raise UserError(f"checkpoint={cfg.checkpoint!r} was not trained with a target domain: name the domain to "
                        "compare with, e.g. target=usps target.dataset.root=DIR.")
    return stored_dataset(stored)
