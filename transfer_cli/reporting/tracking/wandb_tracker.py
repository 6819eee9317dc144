"""Weights & Biases, offline by default: the run is written under ``<run>/wandb/`` and nothing touches the
network until the user runs ``wandb sync``. The run id comes from the run's folder, so a resumed run
continues the same W&B run; a sweep's jobs share its group."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import wandb

from transfer_cli.reporting.tracking.base import Tracker
from transfer_cli.reporting.tracking.record import RunRecord


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, mode: str, project: str, entity: str | None) -> None:
        self.mode, self.project, self.entity = mode, project, entity
        self.run = None
        self.run_dir: Path | None = None
        self.last_step = 0  # W&B steps only go forward
        if mode != "disabled":
            wandb.setup()  # starts W&B's service process now, before the run needs it

    def start(self, record: RunRecord, resumed_after: int) -> None:
        tags = [f"{k}:{v}"[:64] for k, v in record.tags.items() if k in ("command", "dataset", "backbone", "method")]
        self.run_dir = record.run_dir
        self.run = wandb.init(
            project=self.project, entity=self.entity, mode=self.mode, dir=str(record.run_dir), id=run_id(record.run_dir),
            resume="allow", name=record.name, group=record.sweep_dir.name if record.sweep_dir else None,
            job_type=record.command, tags=tags, config=record.params, reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_machine_info=True,
                                    # the git commit is one of the run's tags already; a pip freeze costs ~0.1 s
                                    disable_git=True, disable_code=True, x_save_requirements=False))
        self.last_step = resumed_after

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        if step > self.last_step:
            self.run.log(dict(metrics), step=step)
            self.last_step = step

    def finish(self, status: str, final: Mapping[str, float], notes: Mapping[str, str], files: list[Path]) -> None:
        self.run.summary.update({**final, **notes})
        for path in files:  # under the run folder's name: W&B keeps files of its own (config.yaml) beside them
            self.run.save(str(path), base_path=str(self.run_dir.parent), policy="now")
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    def holds(self, record: RunRecord) -> bool:
        return any((record.run_dir / "wandb").glob(f"*-run-*-{run_id(record.run_dir)}"))


def run_id(run_dir: Path) -> str:
    """A stable id per run folder (W&B ids: letters and digits)."""
    return hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]
