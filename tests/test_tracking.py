"""Experiment trackers, read back with each library's own reader: MLflow (`MlflowClient` on the SQLite store),
TensorBoard (`EventAccumulator`), W&B offline (its protobuf records). The CSV files stay the source of truth,
so every tracked number is compared with metrics.csv / summary.json."""

from __future__ import annotations

import json
import struct
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest
from conftest import invoke, run_folders, train_in_process

from transfer_cli.reporting.tracking.record import RunRecord, epoch_metrics

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# mlflow is imported by the tests that run (collection stays light on the worker that runs none of them)
pytestmark = pytest.mark.skipif(find_spec("mlflow") is None, reason="the [track] extra (mlflow) is not installed")

QUICK = ("dataset=digits", "trainer.epochs=3")


def store(root: Path, name: str = "mlflow.db") -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / name}")


def runs_of(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=100)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def same_points(actual: list[tuple[int, float]], expected) -> bool:
    """The same steps, in order, with the same values (to float precision)."""
    expected = [(int(step), float(value)) for step, value in expected]
    return [s for s, _ in actual] == [s for s, _ in expected] and [v for _, v in actual] == pytest.approx(
        [v for _, v in expected])


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tracked")
    train_in_process(root / "run", *QUICK, "trainer.plots=true", "tracker=[mlflow,tensorboard]", f"output_dir={root}")
    return root


def test_mlflow_holds_the_params_every_epoch_the_summary_and_the_files(tracked_run):
    client = store(tracked_run)
    (run,) = runs_of(client)
    metrics = pd.read_csv(tracked_run / "run" / "metrics.csv")
    summary = json.loads((tracked_run / "run" / "summary.json").read_text())
    assert run.info.status == "FINISHED" and run.info.run_name == "digits_small_cnn_finetune"
    assert run.data.params["dataset.name"] == "digits" and float(run.data.params["optimizer.lr"]) == 2e-3
    assert run.data.params["trainer.epochs"] == "3" and not any(k.startswith("tracker.") for k in run.data.params)
    tags = run.data.tags
    assert (tags["command"], tags["dataset"], tags["backbone"], tags["method"], tags["seed"]) == (
        "train", "digits", "small_cnn", "finetune", "0")
    assert tags["transfer.run_dir"] == str((tracked_run / "run").resolve())
    for split in ("train", "val"):  # every epoch, at its epoch as step, the value metrics.csv holds
        rows = metrics[metrics["split"] == split]
        for column in ("loss", "acc1"):
            assert same_points(history(client, run.info.run_id, f"{split}/{column}"),
                               zip(rows["epoch"], rows[column], strict=True))
    assert same_points(history(client, run.info.run_id, "test/acc1"), [(summary["best"]["epoch"], summary["test"]["acc1"])])
    assert run.data.metrics["test_acc1"] == pytest.approx(summary["test"]["acc1"])
    assert run.data.metrics["trainable"] == summary["params_trainable"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.csv", "config.yaml", "curves.png"} <= artifacts
    assert "checkpoints" not in artifacts  # tracker.log_model is off by default


def test_tensorboard_events_hold_every_epoch_and_the_hparams(tracked_run):
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events_dir = tracked_run / "run" / "tensorboard"
    metrics = pd.read_csv(tracked_run / "run" / "metrics.csv")
    val = metrics[metrics["split"] == "val"]
    assert same_points(scalars(events_dir, "val/acc1"), zip(val["epoch"], val["acc1"], strict=True))
    events = EventAccumulator(str(events_dir), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    assert "_hparams_/experiment" in events.summary_metadata
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.summary_metadata["_hparams_/session_start_info"].plugin_data.content).session_start_info
    config = yaml.safe_load((tracked_run / "run" / "config.yaml").read_text())
    assert start.hparams["optimizer.lr"].number_value == pytest.approx(config["optimizer"]["lr"])
    assert start.hparams["dataset.name"].string_value == "digits"
    assert "plots/curves" in events.Tags()["images"]
    (curves,) = events.Images("plots/curves")  # the PNG as written, its size read back
    assert curves.encoded_image_string == (tracked_run / "run" / "curves.png").read_bytes() and curves.width > 100


@pytest.mark.slow  # a 4-job sweep and four backfills, each opening an MLflow store
def test_a_sweep_is_one_parent_with_a_child_per_job_diverged_ones_failed_and_backfill_adds_nothing(tmp_path):
    args = ("sweep", "dataset=digits", "trainer=debug", "trainer.epochs=1", "optimizer=sgd", "optimizer.lr=0.01,1e6",
            "seed=0,1", "tracker=mlflow")
    result = invoke(*args, cwd=tmp_path)
    assert result.returncode == 1 and "2 sweep job(s) did not finish" in result.stderr
    (sweep,) = (tmp_path / "outputs" / "sweeps").iterdir()

    def check(client: MlflowClient) -> None:
        runs = runs_of(client)
        parents = [r for r in runs if r.data.tags.get("transfer.kind") == "sweep"]
        children = [r for r in runs if r.data.tags.get("transfer.kind") == "run"]
        assert len(parents) == 1 and len(children) == 4
        assert parents[0].info.status == "FAILED" and "sweep.csv" in {a.path for a in client.list_artifacts(
            parents[0].info.run_id)}
        assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
        by_lr = sorted((float(c.data.params["optimizer.lr"]), c.info.status) for c in children)
        assert by_lr == [(0.01, "FINISHED"), (0.01, "FINISHED"), (1e6, "FAILED"), (1e6, "FAILED")]
        failed = [c for c in children if c.info.status == "FAILED"]
        assert all("diverged" in c.data.tags["error"] for c in failed)

    check(store(tmp_path / "outputs"))
    for _ in range(2):  # the same store already holds the sweep; a new store gets it once
        for uri in ([], [f"tracker.mlflow.tracking_uri=sqlite:///{tmp_path / 'backfill.db'}"]):
            done = invoke("report", str(sweep), "tracker=mlflow", *uri, cwd=tmp_path)
            assert done.returncode == 0, done.stderr
    check(store(tmp_path / "outputs"))
    check(store(tmp_path, "backfill.db"))


@pytest.mark.slow  # a stopped run and its resume, two trackers each
def test_a_killed_run_resumes_into_the_same_mlflow_run_without_repeating_steps(tmp_path, monkeypatch):
    """Killed after epoch 3 was logged but before it was checkpointed: the resumed start trains epoch 3 again
    (bit for bit) and logs it nowhere twice, in the same MLflow run; TensorBoard purges the stale step."""
    import transfer_cli.train as train

    run = tmp_path / "run"
    args = ("dataset=digits", "trainer.epochs=4", "tracker=[mlflow,tensorboard]", "tracker.log_model=true",
            f"output_dir={tmp_path}")
    real_save = train.save_model

    def killed_at_epoch_3(path, weights, recipe, **facts):
        if facts["epoch"] == 3:
            raise KeyboardInterrupt  # what the process saw of the kill
        real_save(path, weights, recipe, **facts)

    monkeypatch.setattr(train, "save_model", killed_at_epoch_3)
    assert invoke("train", "trainer=debug", *args, f"hydra.run.dir={run}", cwd=tmp_path).returncode == 130
    (stopped,) = runs_of(store(tmp_path))
    assert stopped.info.status == "KILLED" and [s for s, _ in history(store(tmp_path), stopped.info.run_id,
                                                                       "val/acc1")] == [1, 2, 3]
    monkeypatch.setattr(train, "save_model", real_save)
    train_in_process(tmp_path / "again", *args, f"trainer.resume={run}")
    (resumed,) = runs_of(store(tmp_path))
    assert resumed.info.run_id == stopped.info.run_id and resumed.info.status == "FINISHED"
    checkpoints = {a.path for a in store(tmp_path).list_artifacts(resumed.info.run_id, "checkpoints")}
    assert checkpoints == {"checkpoints/best.safetensors", "checkpoints/best.json"}  # tracker.log_model=true
    val = pd.read_csv(run / "metrics.csv").query("split == 'val'")
    expected = list(zip(val["epoch"], val["acc1"], strict=True))
    assert same_points(history(store(tmp_path), resumed.info.run_id, "val/acc1"), expected)
    assert same_points(scalars(run / "tensorboard", "val/acc1"), expected)


def wandb_records(path: Path) -> list:
    """The records of a .wandb file (W&B's LevelDB-style log: 32 KiB blocks of checksum, length, kind, data;
    the data are W&B's own protobuf ``Record`` messages)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buffer, records = path.read_bytes(), 7, 32768, b"", []  # 7: the ":W&B" file header
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or kind == 0:
            pos += left
            continue
        buffer += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buffer)
            records.append(record)
            buffer = b""
    return records


@pytest.mark.slow  # W&B starts its own service process (~5 s)
def test_wandb_offline_run_holds_the_config_and_every_epoch(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the [track] extra (wandb) is not installed")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: any network use would fail
    summary = train_in_process(tmp_path / "run", *QUICK, "tracker=wandb")
    (log,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(log)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["dataset.name"] == "digits" and config["trainer.epochs"] == 3
    steps = {r.history.step.num: {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
             for r in records if r.WhichOneof("record_type") == "history"}
    val = pd.read_csv(tmp_path / "run" / "metrics.csv").query("split == 'val'")
    assert [steps[e]["val/acc1"] for e in (1, 2, 3)] == pytest.approx(list(val["acc1"]))
    assert summary["status"] == "ok"


def test_tracker_problems_are_clear_errors_before_training_or_warnings_after(transfer, tmp_path, monkeypatch):
    code, _, err = transfer("train", *QUICK, "trainer=debug", "tracker=mlflow",
                            "tracker.mlflow.tracking_uri=nosuchscheme://x")
    assert code == 2 and "tracker=mlflow could not start" in err and "nothing was trained" in err
    code, _, err = transfer("train", *QUICK, "trainer=debug", "tracker=neptune")
    assert code == 2 and "tracker" in err and "mlflow" in err and "tensorboard" in err
    code, _, err = transfer("train", *QUICK, "trainer=debug", "tracker=wandb", "tracker.wandb.mode=cloud")
    assert code == 2 and "tracker.wandb.mode='cloud'" in err and "offline" in err
    code, _, err = transfer("train", *QUICK, "trainer=debug", "tracker=tensorboard", "tracker.mlflow.experiment=x")
    assert code == 2 and "tracker.mlflow.experiment=x sets a key of tracker mlflow, which is not chosen" in err
    assert run_folders(tmp_path) == []  # refused before anything ran: no run folder left behind

    from transfer_cli.reporting.tracking.tensorboard_tracker import TensorboardTracker

    def broken(self, step, metrics):
        raise OSError("disk full")

    monkeypatch.setattr(TensorboardTracker, "log_epoch", broken)
    code, _, err = transfer("train", *QUICK, "trainer=debug", "tracker=tensorboard")
    assert code == 0 and "tracker=tensorboard could not log epoch metrics (OSError: disk full)" in err
    (folder,) = (tmp_path / "outputs" / "runs").glob("*/*")
    assert json.loads((folder / "summary.json").read_text())["status"] == "ok"
    assert len(pd.read_csv(folder / "metrics.csv")) == 7  # 3 epochs x train/val + test: the CSV is complete


def test_trackers_start_and_log_in_a_child_process_and_what_fails_there_is_a_warning(transfer, tmp_path,
                                                                                        monkeypatch):
    """The libraries' start-up runs beside the training: the trackers live in a forked child, which the run
    feeds and waits for at its end. A tracker that cannot start there is left out with a warning."""
    import os

    from transfer_cli.reporting.tracking.tensorboard_tracker import TensorboardTracker

    started = TensorboardTracker.start
    pids = tmp_path / "pids"

    def start(self, record, resumed_after):
        pids.write_text(str(os.getpid()))
        started(self, record, resumed_after)

    monkeypatch.setattr(TensorboardTracker, "start", start)
    code, _, err = transfer("train", *QUICK, "trainer=debug", "tracker=tensorboard")
    assert code == 0, err
    (folder,) = (tmp_path / "outputs" / "runs").glob("*/*")
    assert int(pids.read_text()) != os.getpid()  # started in another process ...
    val = pd.read_csv(folder / "metrics.csv").query("split == 'val'")
    assert same_points(scalars(folder / "tensorboard", "val/acc1"), zip(val["epoch"], val["acc1"], strict=True))

    def refused(self, record, resumed_after):
        raise ConnectionError("server went away")

    monkeypatch.setattr(TensorboardTracker, "start", refused)
    code, _, err = transfer("train", *QUICK, "trainer=debug", "tracker=tensorboard", "seed=1")
    assert code == 0 and "tracker=tensorboard could not start (ConnectionError: server went away)" in err
    assert len(run_folders(tmp_path)) == 2


def test_a_run_with_nothing_to_train_leaves_no_tracker_process_behind(transfer, tmp_path):
    import multiprocessing

    code, _, err = transfer("train", *QUICK, "trainer=debug", "tracker=tensorboard", "optimizer.lr=-1")
    assert code == 2 and "optimizer.lr=-1" in err  # refused after the trackers' child started
    args = ("sweep", *QUICK, "trainer=debug", "trainer.epochs=1", "seed=0", "tracker=tensorboard", "hydra.sweep.dir=s")
    assert transfer(*args)[0] == 0
    events = sorted((tmp_path / "s" / "0" / "tensorboard").iterdir())
    code, out, _ = transfer(*args)  # the same sweep again: its finished job is reused, nothing is logged
    assert code == 0 and sorted((tmp_path / "s" / "0" / "tensorboard").iterdir()) == events
    assert multiprocessing.active_children() == [] and run_folders(tmp_path) == []


def test_a_refused_run_creates_no_mlflow_store(transfer, tmp_path):
    code, _, err = transfer("train", *QUICK, "trainer=debug", "tracker=mlflow", "optimizer.lr=-1",
                            f"output_dir={tmp_path}")
    assert code == 2 and "optimizer.lr=-1" in err
    assert not (tmp_path / "mlflow.db").exists() and run_folders(tmp_path) == []


def test_an_mlflow_store_that_is_not_a_database_is_refused_before_training(transfer, tmp_path):
    (tmp_path / "mlflow.db").write_text("not a database")
    code, _, err = transfer("train", *QUICK, "trainer=debug", "tracker=mlflow", f"output_dir={tmp_path}")
    assert code == 2 and "tracker=mlflow could not start (DatabaseError" in err and "nothing was trained" in err
    assert run_folders(tmp_path) == [] and (tmp_path / "mlflow.db").read_text() == "not a database"


def test_a_missing_tracker_library_names_the_extra(transfer, monkeypatch):
    import sys

    for module in ("mlflow", "mlflow.entities", "mlflow.tracking"):  # import mlflow... -> ImportError
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, "transfer_cli.reporting.tracking.mlflow_tracker", raising=False)
    code, _, err = transfer("train", *QUICK, "trainer=debug", "tracker=mlflow")
    assert code == 2 and "tracker=mlflow needs the mlflow package" in err and "[track]" in err


def test_the_record_flattens_the_config_and_leaves_empty_cells_out(tmp_path):
    record = RunRecord.of_run(tmp_path / "3", {"name": "n", "seed": 1, "dataset": {"name": "d", "classes": [5, 6]},
                                               "tracker": {"mlflow": {"experiment": "e"}}}, in_sweep=True)
    assert record.params == {"name": "n", "seed": 1, "dataset.name": "d", "dataset.classes": "[5, 6]"}
    assert record.name == "n-3" and record.sweep_dir == tmp_path.resolve()
    rows = [{"epoch": 1, "split": "train", "loss": 0.5, "lr": 0.1}, {"epoch": 1, "split": "val", "loss": 0.4,
                                                                   "lr": float("nan")}]
    assert epoch_metrics(rows) == {1: {"train/loss": 0.5, "train/lr": 0.1, "val/loss": 0.4}}


def test_the_trackers_process_needs_no_torch():
    """It is forked before the run imports torch; TensorBoard's writer must not import torch there (a second of
    CPU on the cores the training uses)."""
    import subprocess
    import sys

    code = ("import sys; import transfer_cli.reporting.tracking.background, "
            "transfer_cli.reporting.tracking.tensorboard_tracker; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
