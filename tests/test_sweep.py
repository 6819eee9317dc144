"""Sweeps on real tiny runs: aggregation, seed grouping, failed jobs, launchers, report."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import invoke, run_cli

from transfer_cli.reporting.sweep import group_over_seed


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory) -> tuple[Path, object]:
    """4 jobs on digits, 1 epoch each; the two with method.freeze=5 fail (small_cnn has 3 stages)."""
    root = tmp_path_factory.mktemp("sweep")
    result = invoke("sweep", "method.freeze=0,5", "seed=0,1", "trainer=debug", "trainer.epochs=1",
                     f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    return root / "sweep", result


def test_failed_jobs_do_not_stop_the_sweep_and_the_command_fails_at_the_end(failing_sweep):
    folder, result = failing_sweep
    assert result.returncode == 1
    assert "2 sweep job(s) did not finish" in result.stderr and "method.freeze=5 is out of range" in result.stderr
    assert sorted(p.parent.name for p in folder.glob("*/summary.json")) == ["0", "1"]
    assert sorted(p.parent.name for p in folder.glob("*/error.json")) == ["2", "3"]


def test_sweep_table_has_one_row_per_job_with_swept_keys_and_status(failing_sweep):
    folder, _ = failing_sweep
    table = pd.read_csv(folder / "sweep.csv")
    assert list(table.columns[:4]) == ["job", "method.freeze", "seed", "status"]
    assert table["status"].tolist() == ["ok", "ok", "failed", "failed"]
    assert table.loc[table.status == "failed", "error"].str.contains("method.freeze=5 is out of range").all()
    ok = table[table.status == "ok"]
    assert ok["test_acc1"].between(50, 100).all() and (ok["params"] == 94186).all()
    for job in ok["job"]:
        summary = json.loads((folder / str(job) / "summary.json").read_text())
        assert ok.loc[ok.job == job, "test_acc1"].item() == pytest.approx(summary["test"]["acc1"])
    assert (folder / "sweep.md").is_file() and (folder / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_groups_over_seeds(failing_sweep):
    folder, _ = failing_sweep
    table = pd.read_csv(folder / "sweep.csv")
    summary = pd.read_csv(folder / "summary.csv")
    assert summary["method.freeze"].tolist() == [0] and summary["n"].tolist() == [2]
    ok = table[table.status == "ok"]["test_acc1"]
    assert summary["test_acc1_mean"].item() == pytest.approx(ok.mean())
    assert summary["test_acc1_std"].item() == pytest.approx(ok.std())
    assert "±" in (folder / "summary.md").read_text()


def test_report_rebuilds_the_same_tables_and_marks_interrupted_jobs(failing_sweep, tmp_path):
    folder, _ = failing_sweep
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    expected = (copy / "sweep.csv").read_text()
    for name in ("sweep.csv", "sweep.md", "summary.csv", "summary.md", "sweep.png"):
        (copy / name).unlink()
    assert invoke("report", str(copy), cwd=tmp_path).returncode == 0
    assert (copy / "sweep.csv").read_text() == expected and (copy / "sweep.png").is_file()
    (copy / "1" / "summary.json").unlink()  # as if job 1 had been killed mid-run
    assert invoke("report", str(copy), cwd=tmp_path).returncode == 0
    assert pd.read_csv(copy / "sweep.csv")["status"].tolist() == ["ok", "incomplete", "failed", "failed"]


def test_report_compares_two_sweeps(failing_sweep, tmp_path):
    folder, _ = failing_sweep
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    result = invoke("report", str(folder), str(other), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    comparison = pd.read_csv(next((tmp_path / "outputs" / "reports").glob("*/comparison.csv")))
    assert comparison["sweep"].tolist() == ["sweep", "other"] and (comparison["n"] == 2).all()


def test_report_on_a_folder_that_is_neither_run_nor_sweep_exits_2(tmp_path):
    result = invoke("report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "neither a run folder" in result.stderr


@pytest.mark.slow  # a launcher / sweeper plugin in its own processes
def test_joblib_launcher_runs_jobs_in_parallel_with_their_share_of_threads(tmp_path):
    result = run_cli("sweep", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", "trainer.epochs=1",
                     "trainer.progress=none", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert pd.read_csv(tmp_path / "s" / "sweep.csv")["status"].tolist() == ["ok", "ok"]
    assert "threads: 1" in (tmp_path / "s" / "0" / "config.yaml").read_text()


@pytest.mark.slow  # a launcher / sweeper plugin in its own processes
def test_optuna_search_preset_runs_trials_and_maximises_val_accuracy(tmp_path):
    result = run_cli("sweep", "sweep=search", "hydra.sweeper.n_trials=2", "trainer.epochs=1", "trainer.progress=none",
                     f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "s" / "sweep.csv")
    assert len(table) == 2 and {"optimizer.lr", "optimizer.weight_decay"} <= set(table.columns)
    assert "Best value" in result.stdout + result.stderr


@pytest.mark.slow  # a launcher / sweeper plugin in its own processes
def test_submitit_local_executor_runs_a_job(tmp_path):
    result = run_cli("sweep", "hydra/launcher=submitit_local", "seed=0", "trainer.epochs=1", "trainer.progress=none",
                     f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert pd.read_csv(tmp_path / "s" / "sweep.csv")["status"].tolist() == ["ok"]


def test_group_over_seed_without_other_keys_gives_one_row():
    df = pd.DataFrame({"seed": ["0", "1", "2"], "status": ["ok", "ok", "failed"], "val_acc1": [90.0, 92.0, None],
                       "test_acc1": [89.0, 91.0, None], "test_loss": [0.3, 0.2, None], "seconds": [1.0, 1.0, None]})
    grouped = group_over_seed(df, ["seed"])
    assert grouped["n"].tolist() == [2] and grouped["val_acc1_mean"].item() == 91.0
    assert grouped["val_acc1_std"].item() == pytest.approx(2 ** 0.5)


def test_planned_jobs_include_the_preset_sweeper_params(tmp_path):
    from omegaconf import OmegaConf

    from transfer_cli.reporting.sweep import planned_jobs

    OmegaConf.save({"hydra": {"overrides": {"task": ["sweep=methods", "trainer.epochs=2"]},
                              "sweeper": {"params": {"method": "scratch,finetune", "seed": "0,1,2"}}}},
                   tmp_path / "multirun.yaml")
    jobs = planned_jobs(tmp_path)
    assert len(jobs) == 6 and {"sweep": "methods", "trainer.epochs": "2", "method": "finetune", "seed": "2"} in jobs


def test_a_sweep_without_validation_split_writes_every_table_and_exits_0(tmp_path):
    """dataset.val_fraction=0 leaves val_acc1 empty in every job: nothing is picked, but no table is lost."""
    result = invoke("sweep", "dataset.val_fraction=0", "method.freeze=0,1", "trainer.epochs=1", "trainer.progress=none",
                     f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "raised" not in result.stderr and "no validation split: no run picked" in " ".join(result.stdout.split())
    summary = pd.read_csv(tmp_path / "s" / "summary.csv")
    assert summary["val_acc1_mean"].isna().all() and summary["test_acc1_mean"].between(50, 100).all()
    assert (tmp_path / "s" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_sweep_whose_tables_cannot_be_written_exits_1(tmp_path, capsys):
    """Hydra only warns when a callback raises: the CLI must still learn of it, and of a report that never came."""
    from omegaconf import OmegaConf

    from transfer_cli.cli import _exit_on_failed_jobs
    from transfer_cli.errors import UserError
    from transfer_cli.reporting.sweep import SweepReport

    job = tmp_path / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["seed=0"]), job / ".hydra" / "overrides.yaml")
    (job / "summary.json").write_text("{truncated")
    status = tmp_path / "status.json"
    with pytest.raises(UserError, match="not valid JSON"):
        SweepReport(str(status)).on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}}))
    with pytest.raises(SystemExit) as exit_info:
        _exit_on_failed_jobs(status)
    message = " ".join(capsys.readouterr().err.split())
    assert exit_info.value.code == 1 and "could not be written" in message and "not valid JSON" in message
    assert not status.exists()
    with pytest.raises(SystemExit) as exit_info:  # the status file never written at all
        _exit_on_failed_jobs(status)
    assert exit_info.value.code == 1 and "ended without its report" in capsys.readouterr().err
