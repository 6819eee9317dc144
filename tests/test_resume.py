"""A run killed with SIGKILL resumes to the same weights and metrics as a run never stopped; a sweep
resumes by re-running only what is missing, failed or unfinished."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from resume_kill import METHODS  # noqa: E402 - the method settings the kill benchmark uses too

TIMING = ["seconds", "samples_per_s"]  # wall-clock columns differ between any two runs
COMMON = ["trainer.epochs=4", "trainer.save_every_s=0", "trainer.deterministic=true", "trainer.threads=1",
          "trainer.progress=plain", "trainer.plots=false", "dataset.image_size=16", "dataset.batch_size=16"]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "transfer_cli", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after_first_checkpoint(proc: subprocess.Popen, run: Path, delay: float) -> int:
    """SIGKILL ``delay`` seconds after the run saved its first resumable state; returns the epoch it had
    reached when killed (from metrics.csv), to show the kill landed mid-run."""
    state = run / "checkpoints" / "train_state.pt"
    deadline = time.monotonic() + 300
    while not state.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = pd.read_csv(run / "metrics.csv")
    return int(done["epoch"].max())


def final_state(run: Path) -> tuple[dict, pd.DataFrame]:
    weights = load_file(str(run / "checkpoints" / "last.safetensors"))
    metrics = pd.read_csv(run / "metrics.csv").drop(columns=TIMING)
    return weights, metrics


def assert_same_end(reference: Path, resumed: Path) -> None:
    """Bit-identical final weights, and the same metrics rows (wall-clock columns aside), none twice."""
    ref_weights, ref_metrics = final_state(reference)
    weights, metrics = final_state(resumed)
    assert ref_weights.keys() == weights.keys()
    assert all(torch.equal(ref_weights[k], weights[k]) for k in weights)
    assert not metrics.duplicated(["epoch", "split"]).any()
    pd.testing.assert_frame_equal(metrics, ref_metrics)


@pytest.mark.slow  # three interpreters, one killed with SIGKILL
@pytest.mark.parametrize("method", ["finetune"])  # the other methods stop and resume in-process, below
def test_killed_run_resumes_bit_identically(tmp_path, method):
    args = [*COMMON, *METHODS[method], f"name={method}"]
    reference = start([*args, "hydra.run.dir=reference"], tmp_path)
    killed = start([*args, "hydra.run.dir=killed"], tmp_path)
    reached = kill_after_first_checkpoint(killed, tmp_path / "killed", delay=1.0)
    assert reference.wait() == 0, reference.stdout.read()
    assert not (tmp_path / "killed" / "summary.json").exists() and reached < 4

    resumed = start([*args, "hydra.run.dir=resumed", "trainer.resume=killed"], tmp_path)
    log = resumed.communicate()[0]
    assert resumed.returncode == 0, log
    assert "resuming killed at epoch" in log
    assert not (tmp_path / "resumed").exists()  # the run went on in its own folder

    assert_same_end(tmp_path / "reference", tmp_path / "killed")
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["epochs"] == 4


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # trainer.threads=1 sets the process's count
    yield
    torch.set_num_threads(threads)


# The fast tier keeps a target iterator (dann) and a phase switch (gradual_unfreeze); the other methods' extra
# state (adapters and averages, SHOT's centroids, CDAN+MCC, SWA) is checked by the full run.
FAST_RESUME = ("dann", "gradual_unfreeze")


@pytest.mark.parametrize("method", [m if m in FAST_RESUME else pytest.param(m, marks=pytest.mark.slow)
                                    for m in sorted(set(METHODS) - {"finetune"})])
def test_a_run_stopped_after_an_epoch_resumes_bit_identically(tmp_path, monkeypatch, keep_threads, method):
    """Every method's resumable state (its own extra state, averages, target iterators, phase switches) is
    complete: the folder a run leaves right after saving its second epoch's state (what a kill at that moment
    leaves on disk, copied while the run goes on) resumes to the end bit-identical to the run never stopped.
    In-process; the SIGKILL itself is tested above, through the real binary."""
    from conftest import train_in_process, train_with_a_copy_at_epoch

    small = ["dataset.shots=12", *(["target.dataset.shots=12"] if any(a.startswith("target=") for a in METHODS[method])
                                   else [])]  # 120 images per domain: 8 steps an epoch
    args = [*COMMON, *METHODS[method], *small, f"name={method}", f"output_dir={tmp_path}"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    train_with_a_copy_at_epoch(reference, killed, 2, monkeypatch, *args)
    assert not (killed / "summary.json").exists()
    assert pd.read_csv(killed / "metrics.csv")["epoch"].max() == 2
    summary = train_in_process(tmp_path / "resumed", *args, f"trainer.resume={killed}")
    assert summary["run_dir"] == str(killed) and summary["epochs"] == 4

    assert_same_end(reference, killed)


def test_a_cut_backbone_resumes_bit_identically(tmp_path, monkeypatch, keep_threads):
    """backbone.cut rebuilds the traced body from the config on resume: the same parameters under the same names."""
    from conftest import train_in_process, train_with_a_copy_at_epoch

    args = [*COMMON, "backbone.cut=2", "dataset.shots=12", "name=cut", f"output_dir={tmp_path}"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    train_with_a_copy_at_epoch(reference, killed, 2, monkeypatch, *args)
    summary = train_in_process(tmp_path / "resumed", *args, f"trainer.resume={killed}")
    assert summary["run_dir"] == str(killed) and summary["params_total"] < 60_000  # the cut body, not the whole
    assert_same_end(reference, killed)


def test_resume_auto_finds_the_unfinished_run_and_refuses_another_config(transfer, tmp_path):
    args = ("train", "trainer.epochs=3", "trainer.save_every_s=0", "trainer.progress=none", "trainer.plots=false",
            "name=auto")
    assert transfer(*args)[0] == 0
    (run,) = (tmp_path / "outputs" / "runs" / "auto").iterdir()
    (run / "summary.json").unlink()
    code, out, _ = transfer(*args, "trainer.resume=auto")
    assert code == 0 and f"resuming {run}" in out
    assert len(list((tmp_path / "outputs" / "runs" / "auto").iterdir())) == 1
    (run / "summary.json").unlink()
    code, _, err = transfer(*args, "optimizer.lr=0.5", f"trainer.resume={run}")
    assert code == 2 and "it was started with another config (optimizer.lr" in err
    code, _, err = transfer(*args, f"trainer.resume={tmp_path / 'nowhere'}")
    assert code == 2 and "no such folder" in err


@pytest.mark.slow  # four sweeps; the sweep folder's resume rules change rarely
def test_sweep_resume_reruns_only_missing_failed_and_unfinished_jobs(transfer, tmp_path):
    sweep = ("sweep", "seed=0,1,2,3", "trainer.epochs=2", "trainer.save_every_s=0", "trainer.progress=none",
             "trainer.plots=false")
    assert transfer(*sweep, "hydra.sweep.dir=s")[0] == 0
    folder = tmp_path / "s"
    kept = (folder / "0" / "summary.json").stat().st_mtime_ns
    (folder / "1" / "summary.json").unlink()  # unfinished: resumes from its checkpoint
    (folder / "2" / "summary.json").write_text(json.dumps({"status": "diverged"}))  # failed: runs again
    shutil.rmtree(folder / "3")  # never ran
    code, out, err = transfer(*sweep, f"sweep.resume={folder}")
    assert code == 0, err
    assert "resuming sweep" in err and "already finished with this config" in out
    assert (folder / "0" / "summary.json").stat().st_mtime_ns == kept
    assert "resuming" in out and f"{folder / '1'}" in out
    table = pd.read_csv(folder / "sweep.csv")
    assert table["status"].tolist() == ["ok"] * 4
    # the same overrides in another order name the same sweep
    code, out, err = transfer("sweep", "trainer.plots=false", "trainer.progress=none", "trainer.save_every_s=0",
                              "trainer.epochs=2", "seed=0,1,2,3", f"sweep.resume={folder}")
    assert code == 0 and f"resuming sweep {folder}" in " ".join(err.split()), err
    code, _, err = transfer("sweep", "seed=0,1", "trainer.epochs=2", f"sweep.resume={folder}")
    assert code == 2 and "resume it with the same ones" in err


def test_resume_refuses_a_run_whose_data_changed(transfer, tmp_path):
    from PIL import Image
    from test_trust import digit_folder

    data = digit_folder(tmp_path / "data", classes=(1, 2, 3))
    args = ("train", "dataset=imagefolder", f"dataset.root={data}", "dataset.image_size=8", "dataset.augment=none",
            "trainer.epochs=2", "trainer.save_every_s=0", "trainer.progress=none", "trainer.plots=false", "name=d")
    assert transfer(*args)[0] == 0
    (run,) = (tmp_path / "outputs" / "runs" / "d").iterdir()
    (run / "summary.json").unlink()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(next((data / "train" / "d2").iterdir()))
    code, _, err = transfer(*args, f"trainer.resume={run}")
    assert code == 2 and "changed since the run started" in err


def test_resume_options_with_wrong_values_are_clear_errors(transfer, tmp_path):
    args = ("train", "trainer.epochs=1", "trainer.progress=none", "trainer.plots=false", "name=w")
    assert transfer(*args)[0] == 0
    (finished,) = (tmp_path / "outputs" / "runs" / "w").iterdir()
    code, _, err = transfer(*args, f"trainer.resume={finished}")
    assert code == 2 and "that run already finished" in err
    code, _, err = transfer(*args, f"trainer.resume={tmp_path}")
    assert code == 2 and "has no checkpoints/train_state.pt" in err
    code, out, _ = transfer(*args, "trainer.resume=auto")  # nothing unfinished: a new run, said so
    assert code == 0 and "starting a new one" in out
    code, _, err = transfer("sweep", "seed=0,1", f"sweep.resume={tmp_path}")
    assert code == 2 and "is not a sweep folder" in err
    code, _, err = transfer("sweep", "seed=0,1", "sweep.resume=auto")
    assert code == 2 and "no sweep under outputs/sweeps was started with these overrides" in err
