"""`transfer report DIR [DIR ...]`: rebuild tables and plots from run or sweep folders already on disk."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from rich.console import Console

from transfer_cli.config import conf_dir, register_schemas
from transfer_cli.config_errors import composition_message
from transfer_cli.errors import UserError
from transfer_cli.files import atomic_write_text
from transfer_cli.reporting.plots import plot_curves
from transfer_cli.reporting.summary import summary_frame, write_summary_md
from transfer_cli.reporting.sweep import (
    group_over_seed,
    is_sweep_folder,
    job_dirs,
    pretty_grouped,
    read_json,
    sweep_files,
    sweep_frame,
    sweep_overrides,
    write_sweep_report,
)
from transfer_cli.reporting.tables import markdown_table, rich_record, rich_table, write_table
from transfer_cli.reporting.tracking import TRACKERS
from transfer_cli.reporting.tracking.backfill import backfill_run, backfill_sweep, trackers_for
from transfer_cli.reporting.tracking.base import chosen
from transfer_cli.run_folder import RunFolder, RunSummary


def is_run_dir(folder: Path) -> bool:
    return RunFolder(folder).metrics.is_file()


def read_metrics(path: Path) -> pd.DataFrame:
    """A run's metrics.csv, or a clear error when it is empty or not the table `transfer train` writes."""
    try:
        metrics = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is empty or not a CSV table ({err}); nothing was rewritten.") from None
    missing = [c for c in ("epoch", "split", "loss", "acc1") if c not in metrics.columns]
    if missing or metrics.empty:
        raise UserError(f"{path} is not a metrics table written by `transfer train` (no rows, or missing "
                        f"columns {missing}); nothing was rewritten.")
    return metrics


def rebuild_run(folder: Path, console: Console) -> None:
    """Rebuild what is derived from a run's metrics.csv and summary.json (metrics.md, curves.png,
    summary.md); the CSV and JSON themselves are the record and are never rewritten."""
    run = RunFolder(folder)
    metrics = read_metrics(run.metrics)
    atomic_write_text(run.metrics.with_suffix(".md"), markdown_table(metrics) + "\n")
    plot_curves(metrics, run.curves)
    if run.summary.is_file():  # an interrupted run has metrics but no summary yet
        summary = RunSummary.from_json(read_json(run.summary))
        table = summary_frame(summary)
        write_summary_md(run, summary, {"Result": table, "Metrics per epoch": metrics})
        console.print(rich_record(table.iloc[0].to_dict(), title=str(folder)))
    else:
        console.print(rich_table(metrics.tail(6), title=f"{folder} (no summary.json: the run did not finish)"))


def compare_sweeps(folders: list[Path], out_dir: Path, console: Console) -> pd.DataFrame:
    frames, all_keys = [], []
    for folder in folders:
        df, keys = sweep_frame(folder)
        frames.append(df.assign(sweep=folder.name))
        all_keys += [k for k in keys if k not in all_keys]
    combined = pd.concat(frames, ignore_index=True)
    keys = ["sweep", *all_keys]
    grouped = group_over_seed(combined, keys)
    write_table(combined, out_dir / "comparison_runs.csv")
    write_table(grouped, out_dir / "comparison.csv", markdown=False)
    pretty = pretty_grouped(grouped, keys)
    atomic_write_text(out_dir / "comparison.md", pretty.to_markdown(index=False) + "\n")
    console.print(rich_table(pretty, title="sweeps compared"))
    return grouped


def tracker_node(overrides: list[str]) -> DictConfig:
    """The ``tracker`` node that ``transfer train`` composes from the same overrides."""
    from hydra import compose, initialize_config_dir

    register_schemas()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except Exception as err:
        raise UserError(f"transfer report {' '.join(overrides)}: {composition_message(err, conf_dir(), 'config', overrides)}"
                        ) from None
    if not chosen(cfg.tracker):
        raise UserError(f"transfer report {' '.join(overrides)} chooses no tracker to log to. Choose from "
                        f"{', '.join(TRACKERS.names())}: tracker=mlflow or tracker=[mlflow,tensorboard].")
    return cfg.tracker


def run_report(paths: list[str], output_dir: str = "outputs", console: Console | None = None,
               tracker: list[str] = ()) -> None:
    """``tracker``: overrides such as ``tracker=mlflow tracker.mlflow.tracking_uri=URI``; the folders' runs
    (a sweep: its parent and jobs) are then also logged to those trackers."""
    console = console or Console()
    if not paths:
        raise UserError("transfer report needs at least one folder: a run dir (with metrics.csv) or a sweep dir.")
    folders = [Path(p).expanduser() for p in paths]
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"transfer report {folder}: no such folder.")
        if not is_run_dir(folder) and not job_dirs(folder):
            raise UserError(f"transfer report {folder}: neither a run folder (metrics.csv) nor a sweep folder "
                            "(job folders with .hydra/overrides.yaml).")
    build = trackers_for(tracker_node(list(tracker))) if tracker else None
    if len(folders) == 1 or build:
        for folder in folders:
            if is_run_dir(folder):
                rebuild_run(folder, console)
                if build:
                    console.print(f"{folder}: {backfill_run(folder, build, in_sweep=False)}", highlight=False)
            else:
                write_sweep_report(folder, console)
                if build:
                    backfill_sweep(folder, job_dirs(folder), sweep_overrides(folder) if is_sweep_folder(folder) else [],
                                   sweep_files(folder), build, console)
        return
    if any(is_run_dir(f) for f in folders):
        raise UserError("transfer report A B compares sweeps; give sweep folders (one run folder at a time otherwise).")
    out_dir = Path(output_dir) / "reports" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    compare_sweeps(folders, out_dir, console)
    console.print(f"written to {out_dir}")
