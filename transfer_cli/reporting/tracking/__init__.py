"""Experiment trackers (``tracker=[mlflow,tensorboard,wandb]``) beside the CSV tables, which are always
written. Each tracker's library is imported only when it is chosen (the ``[track]`` extra)."""

from __future__ import annotations

from transfer_cli.reporting.tracking.base import TRACKERS, Tracker, Trackers, build_tracker
from transfer_cli.reporting.tracking.record import RunRecord


@TRACKERS.register("mlflow")
def _mlflow(output_dir: str, tracking_uri: str | None, experiment: str) -> Tracker:
    from transfer_cli.reporting.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(tracking_uri, experiment, output_dir)


@TRACKERS.register("tensorboard")
def _tensorboard(output_dir: str, dir: str) -> Tracker:  # noqa: A002 - the config key
    from transfer_cli.reporting.tracking.tensorboard_tracker import TensorboardTracker

    return TensorboardTracker(dir)


@TRACKERS.register("wandb")
def _wandb(output_dir: str, mode: str, project: str, entity: str | None) -> Tracker:
    from transfer_cli.reporting.tracking.wandb_tracker import WandbTracker

    return WandbTracker(mode, project, entity)


__all__ = ["TRACKERS", "RunRecord", "Tracker", "Trackers", "build_tracker"]
