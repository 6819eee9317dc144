"""What every tracker receives about a run, the same for all of them, built from what the run writes: the
resolved config (flat params), tags, each epoch's rows of metrics.csv, the summary and the run's files. A
live run and a backfill of a finished one build it from the same pieces, so they log the same things."""

from __future__ import annotations

import functools
import math
import numbers
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer_cli.reporting.summary import summary_row
from transfer_cli.run_folder import RunFolder, RunSummary, flatten

RUN_DIR_TAG = "transfer.run_dir"  # how a store finds a run again: resume, backfill without duplicates
SWEEP_DIR_TAG = "transfer.sweep_dir"
_PLOTS = ("curves.png", "lr_find.png", "features.png", "sweep.png")


@dataclass(frozen=True)
class RunRecord:
    """One run as a tracker sees it."""

    run_dir: Path  # absolute: the run's identity in every store
    name: str
    config: dict[str, Any]  # resolved
    sweep_dir: Path | None = None  # the sweep this run is a job of
    command: str = "train"

    @classmethod
    def of_run(cls, run_dir: Path, config: dict[str, Any], in_sweep: bool) -> RunRecord:
        """A run folder and its resolved config; a sweep job's folder sits in the sweep's folder."""
        run_dir = run_dir.resolve()
        name = str(config.get("name") or run_dir.name)
        return cls(run_dir, f"{name}-{run_dir.name}" if in_sweep else name, config, run_dir.parent if in_sweep else None)

    @property
    def params(self) -> dict[str, Any]:
        """The config as flat keys (``optimizer.lr``); lists become their text. The tracker's own settings
        are left out: they say where the run is logged, not what it is."""
        flat = flatten({k: v for k, v in self.config.items() if k != "tracker"})
        return {k: str(v) if isinstance(v, (list, tuple)) else v for k, v in flat.items()}

    @property
    def tags(self) -> dict[str, str]:
        cfg = self.config
        tags = {"command": self.command, "dataset": _get(cfg, "dataset.name"), "backbone": _get(cfg, "backbone.name"),
                "method": _get(cfg, "method.name"), "seed": _get(cfg, "seed"), RUN_DIR_TAG: str(self.run_dir)}
        if self.sweep_dir is not None:
            tags[SWEEP_DIR_TAG] = str(self.sweep_dir)
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        return {k: str(v) for k, v in tags.items() if v is not None}


def epoch_metrics(rows: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """metrics.csv rows -> {epoch: {"val/acc1": ...}}: every numeric column, per split, the epoch as step.
    Empty cells (no learning rate on a val row) are left out."""
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        values = out.setdefault(int(row["epoch"]), {})
        for key, value in row.items():
            if key not in ("epoch", "split") and _is_number(value):
                values[f"{row['split']}/{key}"] = float(value)
    return out


def final_metrics(summary: RunSummary) -> tuple[dict[str, float], dict[str, str]]:
    """The summary's table row (test / target accuracy, best epoch, parameters, seconds) and the rate
    ``optimizer.lr=auto`` chose, as numbers; its text fields (status, validator, error) as tags."""
    row = {**summary_row(summary), "lr_found": summary.lr_found, "select": summary.select}
    numbers = {k: float(v) for k, v in row.items() if _is_number(v)}
    texts = {k: str(v) for k, v in row.items() if isinstance(v, str) and k not in ("dataset", "backbone", "method")}
    return numbers, texts


def run_files(folder: RunFolder, log_model: bool) -> list[Path]:
    """The run's record and plots; with ``log_model`` its kept checkpoint and the sidecar that rebuilds it."""
    files = [folder.config, folder.summary, folder.metrics, folder.validators, folder.lr_find,
             *(folder.path / name for name in _PLOTS)]
    if log_model:
        files += [folder.best, folder.best.with_suffix(".json")]
    return [f for f in files if f.is_file()]


@functools.cache
def git_commit() -> str | None:
    """The commit of the repository the command runs in, when it runs in one."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
