"""MLflow: by default one local SQLite store for every run (``<output_dir>/mlflow.db``, artifacts beside it);
a sweep is a parent run with one child per job. Runs are found again by their folder (a tag), which is how a
resumed run continues its MLflow run and how a backfill never logs a run twice."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from transfer_cli.files import atomic_write_text
from transfer_cli.reporting.tracking.base import Tracker
from transfer_cli.reporting.tracking.preflight import mlflow_uri, sqlite_path
from transfer_cli.reporting.tracking.record import RUN_DIR_TAG, SWEEP_DIR_TAG, RunRecord

PARENT_FILE = "mlflow_parent.json"  # in a sweep folder: the parent run its jobs log under
_KIND_TAG = "transfer.kind"
_BATCH = 100  # params / metrics per request (the store's limit per call)
_VALUE_CHARS = 6000


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, tracking_uri: str | None, experiment: str, output_dir: str) -> None:
        self.uri = mlflow_uri(tracking_uri, output_dir)
        # a SQLite store keeps its experiments' artifacts beside it (MLflow's default is ./mlruns of the cwd)
        self.store = sqlite_path(self.uri)
        if self.store is not None:
            self.store.parent.mkdir(parents=True, exist_ok=True)
        self.experiment = experiment
        for chatty in ("mlflow", "alembic"):  # schema migrations of a new store log at INFO
            logging.getLogger(chatty).setLevel(logging.WARNING)
        if self.store is None or self.store.is_file():  # a new SQLite store is created by the run's start, so
            # a run refused before it starts leaves no empty database behind
            self.client.get_experiment_by_name(experiment)  # opens the store now: its schema check takes a second
        self.run_id: str | None = None
        self.logged: dict[str, int] = {}  # key -> the last step an earlier start of this run logged

    @functools.cached_property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)  # opens (for SQLite: creates) the store

    def start(self, record: RunRecord, resumed_after: int) -> None:
        found = self._find(RUN_DIR_TAG, str(record.run_dir), kind="run") if resumed_after else None
        if found is not None:
            self.run_id = found.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged = self._last_steps(self.run_id)
            return
        parent = self._parent(record.sweep_dir) if record.sweep_dir else None
        experiment_id = parent["experiment_id"] if parent else self._experiment_id(self.experiment)
        tags = {**record.tags, _KIND_TAG: "run", **({"mlflow.parentRunId": parent["run_id"]} if parent else {})}
        self.run_id = self.client.create_run(experiment_id, tags=tags, run_name=record.name).info.run_id
        params = [Param(k, str(v)[:_VALUE_CHARS]) for k, v in record.params.items()]
        for i in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + _BATCH])

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        # a resumed run trains again (bit for bit) the epochs its last checkpoint did not hold: logged once
        self._metrics({k: v for k, v in metrics.items() if step > self.logged.get(k, 0)}, step)

    def finish(self, status: str, final: Mapping[str, float], notes: Mapping[str, str], files: list[Path]) -> None:
        self._metrics(final, 0)
        if notes:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v[:_VALUE_CHARS]) for k, v in notes.items()])
        for path in files:
            self.client.log_artifact(self.run_id, str(path), "checkpoints" if path.parent.name == "checkpoints" else None)
        self.client.set_terminated(self.run_id, status)

    def holds(self, record: RunRecord) -> bool:
        return self._find(RUN_DIR_TAG, str(record.run_dir), kind="run") is not None

    def start_sweep(self, sweep_dir: Path, name: str, params: Mapping[str, Any]) -> None:
        """The sweep's parent run (found again when the sweep resumes or is backfilled), and the file in the
        sweep folder that tells its jobs, in whatever process they run, where it is."""
        found = self._find(SWEEP_DIR_TAG, str(sweep_dir), kind="sweep")
        if found is not None:
            run_id, experiment_id = found.info.run_id, found.info.experiment_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            experiment_id = self._experiment_id(self.experiment)
            tags = {SWEEP_DIR_TAG: str(sweep_dir), _KIND_TAG: "sweep", "command": "sweep"}
            run_id = self.client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
            self.client.log_batch(run_id, params=[Param(k, str(v)[:_VALUE_CHARS]) for k, v in params.items()])
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(sweep_dir / PARENT_FILE, json.dumps(
            {"tracking_uri": self.uri, "experiment_id": experiment_id, "run_id": run_id}))

    def finish_sweep(self, sweep_dir: Path, status: str, files: list[Path]) -> None:
        parent = self._parent(sweep_dir)
        if parent is None:
            return
        for path in files:
            self.client.log_artifact(parent["run_id"], str(path))
        self.client.set_terminated(parent["run_id"], status)

    def _parent(self, sweep_dir: Path) -> dict[str, str] | None:
        marker = sweep_dir / PARENT_FILE
        if marker.is_file():
            parent = json.loads(marker.read_text())
            if parent.get("tracking_uri") == self.uri:
                return parent
        found = self._find(SWEEP_DIR_TAG, str(sweep_dir), kind="sweep")
        return {"run_id": found.info.run_id, "experiment_id": found.info.experiment_id} if found else None

    def _metrics(self, values: Mapping[str, float], step: int) -> None:
        # Synchronous: a run's trackers already log in their own process, and MLflow's asynchronous queue
        # costs a second at the end (its thread polls once a second and is joined when the run ends).
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + _BATCH])

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (self.store.parent / "mlartifacts" / name).as_uri() if self.store else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # a parallel sweep job created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _find(self, tag: str, value: str, kind: str) -> Any:
        """The newest run of any experiment with ``tag = value``, or None."""
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        query = f"tags.`{tag}` = '{value}' and tags.`{_KIND_TAG}` = '{kind}'"
        runs = self.client.search_runs(experiments, query, max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def _last_steps(self, run_id: str) -> dict[str, int]:
        keys = [k for k in self.client.get_run(run_id).data.metrics if "/" in k]  # per-epoch keys are split/column
        return {k: max(m.step for m in self.client.get_metric_history(run_id, k)) for k in keys}

