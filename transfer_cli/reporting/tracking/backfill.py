"""Log finished runs and sweeps to trackers from their files, without training again (``transfer report DIR
tracker=mlflow``). Each run is replayed as a live run logs it: the same record, every row of metrics.csv at
its epoch, the summary and the files. A store that already holds a run keeps it, so backfilling twice logs
nothing twice."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from transfer_cli.reporting.tracking.base import Trackers
from transfer_cli.reporting.tracking.record import RunRecord, epoch_metrics
from transfer_cli.run_folder import RunFolder

SettingsFor = Callable[[dict[str, Any]], Trackers]  # a run's resolved config -> the trackers to log it to


def trackers_for(tracker: DictConfig) -> SettingsFor:
    """The chosen ``tracker`` node (unresolved: ``${dataset.name}`` and the like) resolved against each run's
    own config, as that run would have resolved it had the tracker been on when it trained."""

    def build(config: dict[str, Any]) -> Trackers:
        merged = OmegaConf.create({**config, "tracker": OmegaConf.to_container(tracker, resolve=False)})
        settings = OmegaConf.to_container(merged.tracker, resolve=True)
        return Trackers.chosen_in(settings, str(config.get("output_dir", "outputs")))

    return build


def backfill_run(folder: Path, build: SettingsFor, in_sweep: bool) -> str:
    """Logs one run folder; returns what happened, in a few words."""
    run = RunFolder(folder)
    config = run.saved_config()
    if config is None:
        return "skipped: no config.yaml (the run stopped before it started training)"
    summary, error = run.read_summary(), _error(run)
    if summary is None and error is None:
        return "skipped: not finished (no summary.json or error.json)"
    record = RunRecord.of_run(folder, config, in_sweep)
    trackers = build(config).without_holders(record)
    if not trackers:
        return "already logged"
    trackers.start(record, resumed_after=0)
    if run.metrics.is_file():
        for step, metrics in sorted(epoch_metrics(pd.read_csv(run.metrics).to_dict("records")).items()):
            trackers.log_epoch(step, metrics)
    if summary is not None:
        trackers.finish_run(run, summary)
    else:
        trackers.finish("FAILED", {}, {"error": error}, [])
    return f"logged to {', '.join(t.name for t in trackers.trackers)}"


def backfill_sweep(sweep_dir: Path, jobs: list[Path], overrides: list[str], files: list[Path], build: SettingsFor,
                   console: Console) -> None:
    """A sweep as its parent run (the first job's config says where) and one child per job."""
    configs = [c for c in (RunFolder(j).saved_config() for j in jobs) if c is not None]
    parent = build(configs[0]) if configs else Trackers([])
    sweep_dir = sweep_dir.resolve()
    parent.start_sweep(sweep_dir, sweep_dir.name, {"overrides": " ".join(overrides)})
    failed = False
    for job in jobs:
        outcome = backfill_run(job, build, in_sweep=True)
        summary = RunFolder(job).read_summary()
        failed |= summary is None or summary.status != "ok"
        console.print(f"{job}: {outcome}", highlight=False)
    parent.finish_sweep(sweep_dir, "FAILED" if failed else "FINISHED", files)


def _error(run: RunFolder) -> str | None:
    if not run.error.is_file():
        return None
    try:
        return str(json.loads(run.error.read_text()).get("error"))
    except (OSError, ValueError):
        return "failed (error.json unreadable)"

