"""The loop hooks that record each epoch as it ends: metrics.csv (always) and the chosen trackers."""

from __future__ import annotations

from pathlib import Path

from transfer_cli.engine.loop import Hook, State
from transfer_cli.reporting.tables import metrics_frame, write_table
from transfer_cli.reporting.tracking.base import Trackers
from transfer_cli.reporting.tracking.record import epoch_metrics


class MetricsWriter(Hook):
    """Adds one row per split to the history and rewrites metrics.csv, so it is current after every epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def after_epoch(self, state: State) -> None:
        for split, metrics in state.epoch_metrics.items():
            state.history.append({"epoch": state.epoch + 1, "split": split, **metrics})
        write_table(metrics_frame(state.history), self.path, markdown=False)


class TrackingHook(Hook):
    """Each epoch's rows (every split) to the trackers as the run goes; the epoch is the step."""

    def __init__(self, trackers: Trackers) -> None:
        self.trackers = trackers

    def after_epoch(self, state: State) -> None:
        step = state.epoch + 1
        rows = [{"epoch": step, "split": split, **values} for split, values in state.epoch_metrics.items()]
        self.trackers.log_epoch(step, epoch_metrics(rows).get(step, {}))
