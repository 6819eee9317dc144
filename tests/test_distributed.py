"""One run over two processes (torchrun's elastic agent, gloo on the CPU): the same global batch gives the
same training as one process, process 0 alone writes, a killed run resumes exactly, a crashed process
stops the job with a clear message."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import invoke, shared_path, train_in_process
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # real torchrun jobs: several interpreters each

QUICK = ["trainer.progress=plain", "trainer.plots=false", "trainer.deterministic=true"]
TIMING = ["seconds", "samples_per_s"]


def train(args: list[str], cwd: Path, env: dict[str, str] | None = None, wait: bool = True):
    proc = subprocess.Popen([sys.executable, "-m", "transfer_cli", "train", *args, *QUICK], cwd=cwd,
                            env={**os.environ, "COLUMNS": "200", **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if not wait:
        return proc
    log = proc.communicate(timeout=600)[0]
    return proc.returncode, log


def kill_every(marker: str) -> None:
    """SIGKILL every process whose command line holds ``marker`` (torchrun's workers live in their own
    sessions, so killing the agent's process group alone would leave them running)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def on_process_1(tmp_path: Path, code: str) -> dict[str, str]:
    """The environment that runs ``code`` at start-up in process 1 alone (a sitecustomize on PYTHONPATH):
    faults injected into one process of a real torchrun job."""
    hook = tmp_path / "hook"
    hook.mkdir()
    body = "".join(f"    {line}\n" for line in code.splitlines())
    (hook / "sitecustomize.py").write_text(f"import os\nif os.environ.get('RANK') == '1':\n{body}")
    return {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last.safetensors"))


def metrics(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv").drop(columns=TIMING)


def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path):
    mnist = shared_path("datasets", "mnist")
    data = ["dataset=mnist", f"dataset.root={mnist}", "dataset.shots=50", "dataset.val_fraction=0.02",
            "backbone=lenet", "method=finetune", "optimizer=sgd", "optimizer.lr=0.05", "trainer.epochs=20"]
    one = train_in_process(tmp_path / "one", *data, "dataset.batch_size=32")  # the reference: this process
    store = f"sqlite:///{tmp_path / 'track' / 'mlflow.db'}"
    code, log = train([*data, "dataset.batch_size=16", "trainer.devices=2", "hydra.run.dir=two", "tracker=mlflow",
                       f"tracker.mlflow.tracking_uri={store}"], tmp_path)
    assert code == 0, log
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    if importlib.util.find_spec("mlflow"):  # process 0 alone logs: one run, each epoch once
        from mlflow.tracking import MlflowClient

        client = MlflowClient(store)
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")) == list(range(1, 21))
    assert two["processes"] == 2 and two["global_batch"] == one["global_batch"] == 32
    steps = 500 // 32 * 20
    assert steps >= 300  # a few hundred optimizer steps
    # Each global batch holds the same 32 images in both runs (process r takes every 2nd of the permutation)
    # and DDP averages the two halves' gradients: the first epoch agrees to rounding; 300 steps later the
    # rounding has grown, but not the accuracy.
    table, reference = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert table["loss"].iloc[0] == pytest.approx(reference["loss"].iloc[0], rel=1e-4)
    assert table["acc1"].iloc[0] == reference["acc1"].iloc[0]
    assert abs(two["test"]["acc1"] - one["test"]["acc1"]) < 1.0
    assert not table.duplicated(["epoch", "split"]).any() and len(table) == 2 * 20 + 1  # train + val, test
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["one", "track", "two"]  # none per process
    assert log.count("epoch 20/20") == 1  # process 0 alone reports

    # The counts of the 2-process evaluation are the whole test split: a single-process eval agrees exactly.
    out = invoke("eval", f"checkpoint={tmp_path / 'two' / 'checkpoints' / 'best.safetensors'}", "hydra.run.dir=ev",
                 cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    evaluated = pd.read_csv(tmp_path / "ev" / "eval.csv").iloc[0]
    assert evaluated["acc1"] == pytest.approx(two["test"]["acc1"], abs=1e-9)


@pytest.mark.parametrize("method", [
    ["method=gradual_unfreeze", "method.every_epochs=1"],  # the trainable set grows: DDP is built again
    ["method=lora"],  # adapters beside frozen layers
    ["method=dann", "target=usps", "target.dataset.name=digits", "target.dataset.root=null"],  # a discriminator
], ids=["gradual_unfreeze", "lora", "dann"])
def test_methods_with_changing_or_extra_parameters_train_as_one_process(tmp_path, method):
    # LeNet-5 has no BatchNorm, whose batch statistics are per process under DDP (as in PyTorch's own DDP).
    common = ["dataset=digits", "dataset.shots=30", "backbone=lenet", "optimizer=sgd", "optimizer.lr=0.02",
              "trainer.epochs=2", *method]

    def batch(size: int) -> list[str]:
        target = [f"target.dataset.batch_size={size}", "target.dataset.shots=30"] if "method=dann" in method else []
        return [f"dataset.batch_size={size}", *target]

    train_in_process(tmp_path / "one", *common, *batch(32))  # the reference: this process
    code, log = train([*common, *batch(16), "trainer.devices=2", "hydra.run.dir=two"], tmp_path)
    assert code == 0, log
    first, second = weights(tmp_path / "one"), weights(tmp_path / "two")
    changed = [k for k in first if not torch.allclose(first[k], second[k], atol=1e-4)]
    assert not changed, changed  # unsynchronised gradients would leave process 0 with other weights


def test_a_killed_two_process_run_resumes_to_the_same_result(tmp_path):
    args = ["dataset=digits", "backbone=small_cnn", "method=finetune", "trainer.epochs=5", "trainer.save_every_s=0",
            "dataset.batch_size=16", "trainer.devices=2", "name=ddp"]
    code, log = train([*args, "hydra.run.dir=reference"], tmp_path)
    assert code == 0, log
    killed = train([*args, "hydra.run.dir=killed"], tmp_path, wait=False)
    state = tmp_path / "killed" / "checkpoints" / "train_state.pt"
    deadline = time.monotonic() + 300
    while not state.exists():
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    kill_every("hydra.run.dir=killed")  # the launcher (its agent) ...
    kill_every(f"hydra.run.dir={tmp_path / 'killed'}")  # ... and both training processes, as a node failure would
    killed.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()
    assert pd.read_csv(tmp_path / "killed" / "metrics.csv")["epoch"].max() < 5  # killed mid-run
    code, log = train([*args, "hydra.run.dir=resumed", "trainer.resume=killed"], tmp_path)
    assert code == 0, log
    assert "resuming" in log
    reference, resumed = weights(tmp_path / "reference"), weights(tmp_path / "killed")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    pd.testing.assert_frame_equal(metrics(tmp_path / "killed"), metrics(tmp_path / "reference"))


def test_a_crashed_process_stops_the_job_with_a_clear_message(tmp_path):
    # Process 1 dies once training is under way (as an out-of-memory kill would): process 0 must not wait
    # for it forever in the next collective.
    run = tmp_path / "crash_run"
    env = on_process_1(tmp_path, "import threading, time\n"
                                 "def crash():\n"
                                 "    while not os.path.exists(os.environ['CRASH_WHEN']):\n"
                                 "        time.sleep(0.1)\n"
                                 "    os._exit(9)\n"
                                 "threading.Thread(target=crash, daemon=True).start()")
    env["CRASH_WHEN"] = str(run / "metrics.csv")
    proc = train(["dataset=digits", "backbone=small_cnn", "trainer.epochs=300", "trainer.devices=2",
                  f"hydra.run.dir={run}"], tmp_path, env, wait=False)
    while not (run / "metrics.csv").exists():  # the first epoch is done: process 1 exits now
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    crashed = time.monotonic()
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2 and time.monotonic() - crashed < 120, log
    assert "trainer.devices=2: the run failed: process 1 exited with code 9 first" in log


def test_a_linear_probe_runs_on_process_0_alone(tmp_path):
    code, log = train(["dataset=digits", "backbone=small_cnn", "method=linear_probe", "trainer.epochs=2",
                       "trainer.devices=2", "optimizer.scale_lr=linear", "hydra.run.dir=probe"], tmp_path)
    assert code == 0, log
    assert "trains a head on cached features: process 0 runs it alone" in log
    summary = json.loads((tmp_path / "probe" / "summary.json").read_text())
    assert summary["processes"] == 1 and summary["test"]["acc1"] > 0
    assert not (tmp_path / "outputs" / "runs").exists()  # process 1 left no run folder of its own


def test_a_loss_that_goes_non_finite_on_one_process_stops_both(tmp_path):
    # Process 1 alone sees a NaN loss at its 30th step; process 0's losses stay finite.
    env = on_process_1(tmp_path, "import torch.nn.functional as F\n"
                                 "plain, calls = F.cross_entropy, [0]\n"
                                 "def poisoned(*args, **kwargs):\n"
                                 "    calls[0] += 1\n"
                                 "    loss = plain(*args, **kwargs)\n"
                                 "    return loss * float('nan') if calls[0] == 30 else loss\n"
                                 "F.cross_entropy = poisoned")
    code, log = train(["dataset=digits", "backbone=small_cnn", "trainer.epochs=10", "trainer.devices=2",
                       "dataset.batch_size=16", "hydra.run.dir=nan"], tmp_path, env)
    assert code == 3, log  # the exit code of a diverged run
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "training diverged" in log
    assert summary["diverged_at"]["epoch"] == 1  # 39 steps per epoch: both stopped in the first
