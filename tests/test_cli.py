"""End to end through the real command line: train, eval, sweep, --cfg, --help, and error exits."""

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import invoke, run_cli, shared_path

METRIC_COLUMNS = ["epoch", "split", "loss", "acc1", "acc5", "lr", "seconds", "samples_per_s"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    result = invoke("train", "trainer.epochs=3", f"hydra.run.dir={root / 'run'}", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "epoch 3/3" in result.stdout and "test_acc1" in result.stdout
    return root / "run"


def test_train_writes_every_output(trained):
    for name in ("config.yaml", ".hydra/config.yaml", "metrics.csv", "metrics.md", "summary.json", "summary.md",
                 "curves.png", "checkpoints/best.safetensors", "checkpoints/best.json",
                 "checkpoints/last.safetensors", "checkpoints/last.json"):
        assert (trained / name).is_file() and (trained / name).stat().st_size > 0, name
    assert (trained / "curves.png").read_bytes()[:4] == b"\x89PNG"

    metrics = pd.read_csv(trained / "metrics.csv")
    assert list(metrics.columns) == METRIC_COLUMNS
    assert metrics["split"].tolist() == ["train", "val"] * 3 + ["test"]
    assert metrics.loc[metrics.split == "train", "lr"].notna().all()
    assert metrics["acc1"].between(0, 100).all() and (metrics["samples_per_s"] > 0).all()

    summary = json.loads((trained / "summary.json").read_text())
    assert summary["params_trainable"] == summary["params_total"] == 94186
    assert summary["device"] == "cpu" and summary["precision"] == "32"
    assert set(summary["versions"]) >= {"torch", "torchvision", "python", "transfer_cli"}
    assert summary["command"].startswith("transfer train")
    test_row = metrics[metrics.split == "test"].iloc[0]
    assert test_row["acc1"] == pytest.approx(summary["test"]["acc1"])
    assert test_row["epoch"] == summary["best"]["epoch"]
    assert summary["test"]["acc1"] > 90  # digits with a small CNN: 3 epochs are plenty

    sidecar = json.loads((trained / "checkpoints" / "best.json").read_text())
    assert sidecar["format"] == 2
    recipe = sidecar["recipe"]
    assert recipe["backbone"] == "small_cnn" and recipe["classes"] == [str(i) for i in range(10)]
    assert set(recipe["input"]) == {"channels", "size", "mean", "std", "resize", "interpolation"}
    assert sidecar["config"]["dataset"]["name"] == "digits"


def test_eval_rebuilds_the_model_and_reproduces_the_test_accuracy(trained, tmp_path):
    out = tmp_path / "eval"
    result = invoke("eval", f"checkpoint={trained / 'checkpoints' / 'best.safetensors'}",
                     f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "per class" in result.stdout
    row = pd.read_csv(out / "eval.csv").iloc[0]
    summary = json.loads((trained / "summary.json").read_text())
    assert row["acc1"] == pytest.approx(summary["test"]["acc1"])
    assert row["n"] == 360 and 0 < row["macro_f1"] <= 100 and row["acc5"] >= row["acc1"]
    per_class = pd.read_csv(out / "per_class.csv")
    assert list(per_class.columns) == ["class", "precision", "recall", "f1", "support"]
    assert per_class["support"].sum() == 360 and len(per_class) == 10
    confusion = pd.read_csv(out / "confusion.csv")
    assert confusion.shape == (10, 11) and confusion.iloc[:, 1:].to_numpy().trace() == round(row["acc1"] * 3.6)
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_on_another_split(trained, tmp_path):
    result = invoke("eval", f"checkpoint={trained / 'checkpoints' / 'last.safetensors'}", "split=val",
                     f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert pd.read_csv(tmp_path / "eval.csv").iloc[0]["n"] == 180


def test_checkpoint_that_does_not_fit_its_architecture_exits_2_and_is_left_intact(trained, tmp_path):
    weights = tmp_path / "best.safetensors"
    weights.write_bytes((trained / "checkpoints" / "best.safetensors").read_bytes())
    sidecar = json.loads((trained / "checkpoints" / "best.json").read_text())
    sidecar["recipe"]["backbone"] = "lenet"
    (tmp_path / "best.json").write_text(json.dumps(sidecar))
    before = weights.read_bytes()
    result = invoke("eval", f"checkpoint={weights}", cwd=tmp_path)
    assert result.returncode == 2
    assert "the sidecar does not describe these weights (backbone is 'lenet' in the sidecar but 'small_cnn'" in result.stderr
    assert "Traceback" not in result.stderr and weights.read_bytes() == before


def test_cfg_job_prints_the_config_and_runs_nothing(tmp_path):
    result = invoke("train", "--cfg", "job", "trainer.epochs=7", "backbone=resnet18", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "epochs: 7" in result.stdout and "name: resnet18" in result.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow  # five fresh interpreters: the installed binary's help and exit codes
def test_help(tmp_path):
    top = run_cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and "train" in top.stdout and "eval" in top.stdout and "sweep" in top.stdout
    train = run_cli("train", "--help", cwd=tmp_path)
    assert train.returncode == 0
    assert "Config groups" in train.stdout and "optimizer: adagrad, adam, adamw" in train.stdout
    assert "Examples:" in train.stdout and "hydra:" not in train.stdout
    with_override = run_cli("train", "--help", "trainer.epochs=9", cwd=tmp_path)
    assert with_override.returncode == 0 and "epochs: 9" in with_override.stdout
    wrong = run_cli("train", "--help", "dataset=nope", cwd=tmp_path)
    assert wrong.returncode == 2 and "Could not find 'dataset/nope'" in wrong.stderr
    assert run_cli(cwd=tmp_path).returncode == 2


@pytest.mark.parametrize("args, message", [
    (["train", "trainer.epocs=3"], "trainer.epocs=3: there is no option 'epocs'. Keys under trainer: epochs"),
    (["train", "trainer.epochs=abc"], "trainer.epochs=abc is not valid"),
    (["train", "backbone=resnet1000"], "Could not find 'backbone/resnet1000'"),
    (["train", "optimizer=sgd", "optimizer.betas=[0.9,0.99]"], "optimizer.betas=[0.9,0.99]: there is no option 'betas'. Keys under optimizer: name, lr, momentum"),
    (["train", "method.freeze=5"], "method.freeze=5 is out of range: backbone=small_cnn has 3 stages"),
    (["train", "dataset=mnist", "dataset.root=nowhere"], "dataset=mnist: no MNIST data found under dataset.root='nowhere'"),
    (["train", "backbone.weights=missing.safetensors"], "backbone.weights='missing.safetensors': no such file"),
    (["eval", "checkpoint=missing.safetensors"], "checkpoint='missing.safetensors': no such file"),
    (["evaluate"], "unknown command 'evaluate'"),
])
def test_bad_input_exits_2_with_one_clear_message(transfer, args, message):
    # in-process through main(); test_help and test_full_error_shows_the_traceback run the real binary
    code, _, err = transfer(*args, "trainer.epochs=1" if args[0] == "train" else "split=test")
    assert code == 2, err
    assert message in " ".join(err.split())
    assert "Traceback" not in err


@pytest.mark.slow  # a fresh interpreter: what HYDRA_FULL_ERROR=1 prints is the installed binary's behaviour
def test_full_error_shows_the_traceback(tmp_path):
    result = run_cli("train", "method.freeze=5", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_sweep_runs_every_job(tmp_path):
    result = invoke("sweep", "seed=0,1", "trainer.epochs=1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 2
    assert [json.loads(p.read_text())["command"].count("seed") for p in summaries] == [1, 1]


@pytest.mark.slow  # real data from ../shared; the edit loop's runs use the bundled digits
def test_usps_from_shared_files_trains_end_to_end(tmp_path):
    root = shared_path("datasets", "usps")
    result = invoke("train", "dataset=usps", f"dataset.root={root}", "trainer.epochs=1",
                     f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test"]["acc1"] > 88  # USPS test is hard (human error ~2.5%); one epoch gives ~91-93%
