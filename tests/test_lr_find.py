"""optimizer.lr=auto: the learning-rate range test chooses the rate, leaves no trace in the run it precedes,
is never repeated on resume, and is refused where there is no rate to search."""

import json
import math
import shutil

import pandas as pd
import pytest
from conftest import DEBUG, invoke, train_in_process

from transfer_cli.engine import lr_find, train_state
from transfer_cli.engine.lr_find import suggest

TIMING = ["seconds", "samples_per_s"]


def test_the_suggestion_is_halfway_between_the_steepest_descent_and_the_minimum():
    lrs = [10.0 ** e for e in range(-6, 1)]  # 1e-6 ... 1
    losses = [2.0, 1.95, 1.9, 1.0, 0.5, 0.35, 3.0]  # steepest fall around 1e-3, minimum at 1e-1, then it explodes
    assert suggest(lrs, losses) == pytest.approx(1e-2)
    falling = [2.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5]  # steepest at 1e-5, still falling at the end of the sweep
    assert suggest(lrs, falling) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="too few"):
        suggest(lrs[:2], losses[:2])


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auto")
    result = invoke("train", DEBUG, "optimizer.lr=auto", f"output_dir={folder}", f"hydra.run.dir={folder / 'auto'}",
                    cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, json.loads((folder / "auto" / "summary.json").read_text()), result.stdout


def test_lr_auto_writes_its_curve_and_trains_exactly_as_the_rate_it_found(auto_run):
    folder, summary, out = auto_run
    found = summary["lr_found"]
    curve = pd.read_csv(folder / "auto" / "lr_find.csv")
    # the header says what the test cost beside the training it precedes (debug: 2 epochs of 19 batches)
    assert f"optimizer.lr=auto: {found:.3g} from the learning-rate range test ({len(curve)} batches, against 38 " \
           "training batches)" in out
    assert (folder / "auto" / "lr_find.png").stat().st_size > 0
    assert curve["chosen"].sum() == 1 and curve.loc[curve["chosen"], "lr"].item() == found
    assert 1e-5 < found < 1e-1 and len(curve) > 10 and curve["lr"].is_monotonic_increasing
    # the sweep leaves weights, data order and random streams as they were: the same run at that fixed rate
    fixed = train_in_process(folder / "fixed", f"optimizer.lr={found!r}", f"output_dir={folder}")
    assert fixed["lr_found"] is None and fixed["test"]["acc1"] == summary["test"]["acc1"]
    runs = [pd.read_csv(folder / name / "metrics.csv").drop(columns=TIMING) for name in ("auto", "fixed")]
    pd.testing.assert_frame_equal(*runs)


def test_a_resumed_run_reuses_the_rate_it_found(tmp_path, monkeypatch):
    args = ["optimizer.lr=auto", "trainer.epochs=3", f"output_dir={tmp_path}"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    save = train_state.save

    def save_and_copy_at_epoch_1(path, payload):  # what a kill right after the first epoch leaves
        save(path, payload)
        if payload["next_epoch"] == 1:
            shutil.copytree(reference, killed)

    monkeypatch.setattr(train_state, "save", save_and_copy_at_epoch_1)
    first = train_in_process(reference, *args)
    monkeypatch.setattr(train_state, "save", save)

    def no_second_search(*_args, **_kwargs):
        raise AssertionError("the range test ran again on resume")

    monkeypatch.setattr("transfer_cli.run.lr_range_test", no_second_search)
    resumed = train_in_process(tmp_path / "resumed", *args, f"trainer.resume={killed}")
    assert resumed["lr_found"] == first["lr_found"] and math.isfinite(resumed["lr_found"])
    assert resumed["test"]["acc1"] == first["test"]["acc1"]
    assert lr_find.STEPS >= 50  # the sweep itself is long enough to see the fall and the explosion


def test_lr_auto_is_refused_for_a_method_without_a_learning_rate(tmp_path):
    result = invoke("train", DEBUG, "method=linear_probe", "optimizer.lr=auto", f"hydra.run.dir={tmp_path / 'r'}",
                    cwd=tmp_path)
    assert result.returncode == 2
    assert "optimizer.lr=auto" in result.stderr and "solver=lbfgs" in " ".join(result.stderr.split())


def test_a_misspelt_auto_names_the_key_and_what_is_allowed(tmp_path):
    result = invoke("train", DEBUG, "optimizer.lr=Auto", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert result.returncode == 2 and "optimizer.lr='Auto'" in result.stderr and "or auto" in result.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()
