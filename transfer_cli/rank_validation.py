"""`transfer rank validate=top_k:K|all`: train the ranked candidates and measure how well each score ordered
them (Kendall's tau_b, weighted tau, top-1 regret against the test top-1 each candidate reaches)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from scipy import stats

from transfer_cli.errors import UserError, bad_value
from transfer_cli.reporting.tables import rich_table, write_table
from transfer_cli.train import run_train
from transfer_cli.validation import validate

METHODS = ("linear_probe", "finetune")


def check_validate(cfg: DictConfig) -> int | None:
    """How many candidates ``validate`` trains (None: all, 0: none)."""
    if cfg.validate is None:
        return 0
    if cfg.validate_method not in METHODS:
        raise bad_value("validate_method", cfg.validate_method, METHODS)
    if str(cfg.validate) == "all":
        return None
    found = re.fullmatch(r"top_k:([1-9][0-9]*)", str(cfg.validate))
    if not found:
        raise bad_value("validate", cfg.validate, "top_k:K (K >= 1) or all")
    return int(found.group(1))


def validate_ranking(cfg: DictConfig, table: pd.DataFrame, candidates: list[DictConfig], recommend: str,
                     count: int | None, out_dir: Path, console: Console) -> pd.DataFrame:
    """Train the chosen candidates (rows of ``table`` without error; the top ``count`` by ``recommend``), add
    their ``measured_acc1`` to the table and return one row per score: how its order agrees with the measured one."""
    scored = table.index[table["error"].fillna("") == ""]
    order = table.loc[scored].sort_values(recommend, ascending=False).index
    chosen = list(order if count is None else order[:count])
    table["measured_acc1"] = np.nan
    for i in chosen:
        run_cfg = _train_config(cfg, candidates[i])
        summary = run_train(run_cfg, out_dir / "validate" / f"{i}", Console(quiet=True))
        table.loc[i, "measured_acc1"] = summary["test"]["acc1"]
        console.print(f"validated {table.loc[i, 'candidate']}: test top-1 {summary['test']['acc1']:.2f}", highlight=False)
    agreement = _agreement(table.loc[chosen], [s for s in cfg.scores])
    write_table(agreement, out_dir / "validation.csv")
    console.print(rich_table(agreement, title=f"how each score ordered the {len(chosen)} trained candidates"))
    return agreement


def _train_config(cfg: DictConfig, candidate: DictConfig) -> DictConfig:
    """The `transfer train` config of one candidate: rank's dataset and seed, the candidate as backbone."""
    overrides = [f"method={cfg.validate_method}", f"seed={cfg.seed}", f"output_dir={cfg.output_dir}",
                 *cfg.validate_overrides]
    try:
        run_cfg = compose("config", overrides=overrides)
    except Exception as err:  # Hydra's own message names the override
        raise UserError(f"validate_overrides={list(cfg.validate_overrides)}: {' '.join(str(err).split())}") from None
    with open_dict(run_cfg):
        run_cfg.dataset = OmegaConf.merge(run_cfg.dataset, cfg.dataset)
        run_cfg.backbone = OmegaConf.merge(run_cfg.backbone, candidate)
    validate(run_cfg)
    return run_cfg


def _agreement(trained: pd.DataFrame, score_names: list[str]) -> pd.DataFrame:
    measured = trained["measured_acc1"].to_numpy(dtype=float)
    rows = []
    for name in score_names:
        values = trained[name].to_numpy(dtype=float)
        usable = np.isfinite(values)
        if usable.sum() < 2:
            rows.append({"score": name, "candidates": int(usable.sum()), "kendall_tau_b": np.nan,
                         "weighted_tau": np.nan, "top1_regret": np.nan})
            continue
        tau = stats.kendalltau(values[usable], measured[usable], variant="b").statistic
        weighted = stats.weightedtau(values[usable], measured[usable]).statistic
        regret = float(measured[usable].max() - measured[usable][np.argmax(values[usable])])
        rows.append({"score": name, "candidates": int(usable.sum()), "kendall_tau_b": tau, "weighted_tau": weighted,
                     "top1_regret": regret})
    return pd.DataFrame(rows)
