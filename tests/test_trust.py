"""Regression tests for inputs that once gave wrong numbers with exit code 0, or lost work. Each runs the
real CLI entry point (in-process) on real small data and checks the outcome and what is on disk."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DEBUG, run_folders, train_in_process
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from transfer_cli.config import DatasetConfig
from transfer_cli.data.identity import data_identity
from transfer_cli.errors import UserError
from transfer_cli.pipeline import build_data

QUICK = (DEBUG,)


def digit_folder(root, per_class=12, classes=range(10), black=False):
    """Real scikit-learn digits as PNG files in root/train|val/<digit>/."""
    bunch = load_digits()
    counts = {}
    for i, (pixels, label) in enumerate(zip(bunch.images, bunch.target, strict=True)):
        if label not in classes or counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        split = "val" if counts[label] % 4 == 0 else "train"
        folder = root / split / f"d{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image = np.zeros_like(pixels) if black else pixels * 255 / 16
        Image.fromarray(image.astype(np.uint8)).convert("RGB").save(folder / f"{i}.png")
    return root


def summary_of(tmp_path):
    (folder,) = run_folders(tmp_path)
    return folder, json.loads((folder / "summary.json").read_text())


# 1. caches must change with the data ----------------------------------------------------------------
def test_feature_cache_follows_the_image_files(transfer, tmp_path):
    data = digit_folder(tmp_path / "data")
    args = ("train", "dataset=imagefolder", f"dataset.root={data}", "dataset.image_size=16", "dataset.augment=none",
            "method=linear_probe", "trainer.epochs=3", *QUICK)
    assert transfer(*args)[0] == 0
    _, first = summary_of(tmp_path)
    digit_folder(tmp_path / "data", black=True)  # every image replaced by a black one
    for folder in run_folders(tmp_path):
        folder.rename(folder.with_name("old_" + folder.name))
    assert transfer(*args)[0] == 0
    folder = next(f for f in run_folders(tmp_path) if not f.name.startswith("old_"))
    second = json.loads((folder / "summary.json").read_text())
    assert first["test"]["acc1"] > 60
    assert second["test"]["acc1"] <= 20  # black images: chance level, not the cached 60+%
    assert len(list((tmp_path / "outputs" / "cache" / "features").glob("*.safetensors"))) == 6


def test_data_identity_changes_with_a_file_or_the_sample_list(tmp_path):
    data = digit_folder(tmp_path)
    cfg = DatasetConfig(name="imagefolder", root=str(data), cache_dir=str(tmp_path / "cache"))
    before = data_identity(build_data(cfg))
    assert data_identity(build_data(cfg)) == before
    some = next((data / "train" / "d3").iterdir())
    Image.new("RGB", (8, 8), (255, 255, 255)).save(some)
    assert data_identity(build_data(cfg)) != before
    digits = data_identity(build_data(DatasetConfig(name="digits")))
    assert data_identity(build_data(DatasetConfig(name="digits", shots=3))) != digits


# 2. divergence --------------------------------------------------------------------------------------
def test_a_diverging_run_stops_says_so_and_keeps_no_nan_weights(transfer, tmp_path):
    code, _, err = transfer("train", "optimizer=sgd", "optimizer.lr=1e6", "trainer.epochs=3", *QUICK)
    assert code == 3
    assert "training diverged: the loss became non-finite at epoch" in err and "Traceback" not in err
    folder, summary = summary_of(tmp_path)
    assert summary["status"] == "diverged" and summary["diverged_at"]["epoch"] >= 1
    for weights in (folder / "checkpoints").glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(weights)).values() if t.is_floating_point())


def test_zero_std_is_refused_before_training(transfer, tmp_path):
    code, _, err = transfer("train", "dataset.std=[0]", *QUICK)
    assert code == 2 and "dataset.std=[0.0] is not allowed" in err
    assert run_folders(tmp_path) == []


# 3-5. checkpoints, classes, ensembles --------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_5to9(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits_5to9") / "run"
    train_in_process(run, "dataset.classes=[5,6,7,8,9]", "trainer.epochs=4")
    return run / "checkpoints"


@pytest.fixture
def digits_5to9(trained_5to9, tmp_path):
    """A copy of the module's trained checkpoint (weights + sidecar): tests edit it."""
    for name in ("best.safetensors", "best.json"):
        shutil.copy2(trained_5to9 / name, tmp_path / name)
    return tmp_path / "best.safetensors"


def test_starting_weights_that_trained_on_the_scored_samples_are_refused(transfer, tmp_path, trained_5to9):
    """A checkpoint of this tool as backbone.weights, or as a rank candidate, on the data it was trained on: another
    split_seed puts its training samples into the new test split, and rank scores its own training samples; both
    gave inflated numbers with exit 0."""
    ckpt = trained_5to9 / "best.safetensors"
    five = "dataset.classes=[5,6,7,8,9]"
    code, _, err = transfer("train", f"backbone.weights={ckpt}", five, "dataset.split_seed=1", DEBUG)
    assert code == 2 and f"backbone.weights='{ckpt}' was trained on" in err
    assert " of the 90 val and " in err and " of the 180 test samples of dataset=digits" in err
    assert not run_folders(tmp_path) or not (run_folders(tmp_path)[0] / "summary.json").exists()
    assert transfer("train", f"backbone.weights={ckpt}", five, DEBUG)[0] == 0  # the same split: val/test unseen
    assert transfer("train", f"backbone.weights={ckpt}", "dataset.classes=[0,1,2,3,4]", DEBUG)[0] == 0  # other samples

    for classes, refused in ((five, True), ("dataset.classes=[0,1,2,3,4]", False)):
        code, _, err = transfer("rank", f"candidates=[{{name:small_cnn,weights:'{ckpt}'}},small_cnn]", classes,
                                "bootstrap=0", "scores=[logme]", f"output_dir=ranked_{refused}")
        assert code == 0, err
        (found,) = (tmp_path / f"ranked_{refused}" / "ranks").glob("*/rank.csv")
        table = pd.read_csv(found)
        error = str(table["error"].astype("string").fillna("").iloc[0])
        assert ("candidates[0].weights=" in error and "was trained on" in error and "train samples" in error) == refused
        assert np.isnan(table["logme"].iloc[0]) == refused and np.isfinite(table["logme"].iloc[1])


def test_starting_weights_are_refused_when_their_data_changed_since_training(transfer, tmp_path):
    """Which samples a checkpoint trained on is rebuilt from today's files: with files added since, the carve
    differs and the overlap check would be blind, so the run is refused."""
    data = digit_folder(tmp_path / "digits", per_class=8)
    train_in_process(tmp_path / "first", "dataset=imagefolder", f"dataset.root={data}")
    ckpt = tmp_path / "first" / "checkpoints" / "best.safetensors"
    digit_folder(tmp_path / "digits", per_class=12)  # four more images per class
    code, _, err = transfer("train", "dataset=imagefolder", f"dataset.root={data}", f"backbone.weights={ckpt}", DEBUG)
    assert code == 2 and "changed since checkpoint=" in err and "held out then" in err


def test_a_source_model_that_trains_on_the_target_test_samples_is_refused_before_pretraining(transfer, tmp_path):
    """The source split carved with another seed from the target's own data held 252 of its 360 test samples:
    a probe on that source model scored 100.0 % (98.9 % with the source carved like the target), exit 0."""
    source = ("backbone.weights=source", "source=digits_0to4", "source.dataset.classes=null", "source.epochs=2")
    code, _, err = transfer("train", *source, "source.dataset.split_seed=1", DEBUG)
    assert code == 2 and "the source model (source.dataset=digits) was trained on " in err
    assert " of the 360 test samples of dataset=digits" in err and "source.dataset.split_seed=1" in err
    assert not (tmp_path / "outputs" / "cache" / "source").exists()  # refused before any pretraining
    assert transfer("train", *source, DEBUG)[0] == 0  # carved like the target: val and test held out


def test_eval_refuses_other_classes_and_maps_a_reordering_by_name(transfer, tmp_path, digits_5to9):
    code, _, err = transfer("eval", f"checkpoint={digits_5to9}", "dataset=digits", "dataset.classes=[0,1,2,3,4]")
    assert code == 2 and "has the classes 0, 1, 2, 3, 4" in err and "predicts 5, 6, 7, 8, 9" in err
    assert transfer("eval", f"checkpoint={digits_5to9}", "hydra.run.dir=same")[0] == 0
    same = pd.read_csv(tmp_path / "same" / "eval.csv").iloc[0]
    code, out, _ = transfer("eval", f"checkpoint={digits_5to9}", "dataset=digits", "dataset.classes=[9,8,7,6,5]",
                            "hydra.run.dir=reordered")
    assert code == 0 and "matched by name" in out
    reordered = pd.read_csv(tmp_path / "reordered" / "eval.csv").iloc[0]
    assert reordered["acc1"] == pytest.approx(same["acc1"]) and same["acc1"] > 80
    per_class = pd.read_csv(tmp_path / "reordered" / "per_class.csv")
    assert per_class["class"].astype(str).tolist() == ["9", "8", "7", "6", "5"]


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["recipe"]["input"].update(size=64), "input.size is 64 in the sidecar but 8 in the weights file"),
    (lambda s: s.pop("recipe"), "expected a mapping with keys backbone, weights"),
    (lambda s: s["recipe"].pop("classes"), "missing keys ['classes']"),
    (lambda s: s.update(format=1), "has format 1; this transfer_cli reads format 2"),
    (lambda s: s["recipe"]["input"].update(std=[0.0]), "recipe.input.std=[0.0] is not valid"),
])
def test_edited_sidecars_are_refused_and_left_as_they_are(transfer, digits_5to9, edit, message):
    sidecar = digits_5to9.with_suffix(".json")
    content = json.loads(sidecar.read_text())
    edit(content)
    sidecar.write_text(json.dumps(content))
    weights = digits_5to9.read_bytes()
    code, _, err = transfer("eval", f"checkpoint={digits_5to9}")
    assert code == 2 and message in err and "Traceback" not in err
    assert digits_5to9.read_bytes() == weights


@pytest.mark.parametrize("weights", ["[0,0]", "[1,-1]", "[1]", "[1,nan]"])
def test_ensemble_weights_must_be_non_negative_with_a_positive_sum(transfer, digits_5to9, weights):
    code, _, err = transfer("eval", f"checkpoint=[{digits_5to9},{digits_5to9}]", "ensemble=weighted",
                            f"ensemble.weights={weights}")
    assert code == 2 and "ensemble" in err and "Traceback" not in err


def test_weighted_ensemble_normalises_its_weights(transfer, tmp_path, digits_5to9):
    code, _, _ = transfer("eval", f"checkpoint=[{digits_5to9},{digits_5to9}]", "ensemble=weighted",
                          "ensemble.weights=[3,1]", "hydra.run.dir=ens")
    rows = pd.read_csv(tmp_path / "ens" / "eval.csv")
    assert code == 0 and rows["acc1"].nunique() == 1  # two copies of one model, any weighting: the same model


# 6. image folders ----------------------------------------------------------------------------------
def test_image_folder_edge_cases_are_dropped_named_or_refused(tmp_path):
    data = digit_folder(tmp_path / "d", classes=(1, 2, 3))
    (data / "train" / "empty").mkdir()
    (data / "val" / "d7").mkdir()
    Image.new("RGB", (8, 8)).save(data / "val" / "d7" / "x.png")
    good = next((data / "train" / "d1").iterdir())
    Image.new("RGB", (64, 64), (9, 9, 9)).save(data / "train" / "d2" / "cut.jpg", quality=95)
    cut = (data / "train" / "d2" / "cut.jpg").read_bytes()
    (data / "train" / "d2" / "cut.jpg").write_bytes(cut[: len(cut) // 2])  # a truncated JPEG
    splits = build_data(DatasetConfig(name="imagefolder", root=str(data), cache_dir=str(tmp_path / "cache")))
    assert splits.classes == ["d1", "d2", "d3"]  # no phantom "empty" class
    notes = "\n".join(splits.notes)
    assert "without readable images: empty" in notes
    assert "train/ lacks, ignored: d7" in notes
    assert "cut.jpg" in notes and splits.skipped == 1
    assert good.exists()


def test_one_class_and_decompression_bombs_are_refused(tmp_path):
    data = digit_folder(tmp_path / "one", classes=(4,))
    with pytest.raises(UserError, match="classification needs at least two"):
        build_data(DatasetConfig(name="imagefolder", root=str(data), cache_dir=str(tmp_path / "cache")))
    data = digit_folder(tmp_path / "bomb", classes=(1, 2))
    bomb = data / "train" / "d1" / "bomb.png"
    Image.new("1", (14000, 14000)).save(bomb)
    with pytest.raises(UserError, match=r"bomb.png is refused as a decompression bomb"):
        build_data(DatasetConfig(name="imagefolder", root=str(data), cache_dir=str(tmp_path / "cache")))


# 7-9. values and keys ------------------------------------------------------------------------------
BAD = ["trainer.grad_clip=-1", "trainer.steps=-5", "dataset.image_size=0", "optimizer.lr=-1",
       "optimizer.weight_decay=-1", "dataset.num_workers=-1", "head.dropout=1.5", "dataset.test_fraction=1",
       "dataset.test_fraction=0", "+trainer.epocs=5", "trainer.epochs=0", "optimizer.lr=nan",
       "optimizer=sgd optimizer.momentum=1.5", "scheduler=cosine scheduler.min_lr_ratio=2", "method.label_smoothing=1",
       "dataset.val_fraction=0.5 dataset.test_fraction=0.5", "+dataset.colour=red", "dataset.in_memory=maybe",
       "dataset.num_workers=two", "backbone.preprocess.crop=0", "backbone.preprocess.resize=-256",
       "backbone.preprocess.std=[0.2,0,0.2]", "method=linear_probe method.l2=-1", "method=lp_ft method.probe_iters=0",
       "backbone.preprocess.interpolation=lanczos", "trainer.ema_decay=0", "trainer.swa_start=-1",
       "method=lora method.rank=0", "method=lora method.alpha=0", "method=lora method.dropout=1",
       "method=lora method.target_modules=5"]


@pytest.mark.parametrize("override", BAD)
def test_out_of_range_values_and_unknown_keys_exit_2_before_any_work(transfer, tmp_path, override):
    code, out, err = transfer("train", *override.split(), *QUICK)
    assert code == 2, (out, err)
    key = override.split()[-1].split("=")[0].lstrip("+")
    assert key.split(".")[-1] in err and "Traceback" not in err
    assert run_folders(tmp_path) == []


def test_no_validation_split_keeps_the_last_epoch(transfer, tmp_path):
    assert transfer("train", "dataset.val_fraction=0", "trainer.epochs=2", *QUICK)[0] == 0
    _, summary = summary_of(tmp_path)
    assert summary["best"]["split"] == "last" and summary["best"]["epoch"] == 2
    assert summary["test"]["acc1"] > 50


# 10-12. folders and files ----------------------------------------------------------------------------
def test_the_run_folder_suffix_is_random_per_config_and_fixed_within_one():
    from omegaconf import OmegaConf

    from transfer_cli.config import register_schemas

    register_schemas()
    one = OmegaConf.create({"a": "${uid:}", "b": "${uid:}"})
    other = OmegaConf.create({"a": "${uid:}"})
    assert one.a == one.b  # cached per config, like Hydra's ${now:}: a run has one folder
    assert one.a != other.a and len(one.a) == 6


def test_two_runs_with_one_name_get_their_own_folders(transfer, tmp_path):
    for _ in range(2):
        assert transfer("train", "name=same", "trainer.epochs=1", *QUICK)[0] == 0
    first, second = run_folders(tmp_path)
    assert first != second
    for folder in (first, second):
        assert len(pd.read_csv(folder / "metrics.csv").query("split == 'train'")) == 1


def test_a_failed_run_is_marked_and_orphan_temp_files_are_cleaned(transfer, tmp_path):
    code, _, err = transfer("train", "dataset=imagefolder", f"dataset.root={tmp_path / 'nowhere'}", *QUICK)
    assert code == 2 and "has no train/ folder" in err
    (folder,) = run_folders(tmp_path)
    assert json.loads((folder / "error.json").read_text())["status"] == "failed"
    args = ("train", "trainer.epochs=2", "trainer.save_every_s=0", "name=r", *QUICK)
    assert transfer(*args)[0] == 0
    done = next(f for f in run_folders(tmp_path) if f.parent.name == "r")
    (done / "summary.json").unlink()  # as if killed after its last checkpoint
    orphan = done / "checkpoints" / ".last.safetensors.4242.tmp"
    orphan.write_bytes(b"half")
    code, out, _ = transfer(*args, f"trainer.resume={done}")
    assert code == 0 and "removed 1 temporary file" in out and not orphan.exists()


def test_report_keeps_every_row_and_lists_jobs_that_never_ran(transfer, tmp_path):
    assert transfer("sweep", "seed=0,1,2", "trainer.epochs=1", "hydra.sweep.dir=a", *QUICK)[0] == 0
    assert transfer("sweep", "method.freeze=0,1", "trainer.epochs=1", "hydra.sweep.dir=b", *QUICK)[0] == 0
    import shutil

    shutil.rmtree(tmp_path / "a" / "2")  # a job that never ran
    (tmp_path / "a" / "1" / "summary.json").unlink()  # one that did not finish
    assert transfer("report", "a")[0] == 0
    table = pd.read_csv(tmp_path / "a" / "sweep.csv")
    assert sorted(table["status"]) == ["incomplete", "not run", "ok"]
    assert table.loc[table.status == "not run", "seed"].astype(str).tolist() == ["2"]
    assert transfer("report", "a", "b")[0] == 0
    (report,) = (tmp_path / "outputs" / "reports").iterdir()
    runs = pd.read_csv(report / "comparison_runs.csv")
    grouped = pd.read_csv(report / "comparison.csv")
    assert len(runs) == 5 and grouped["n"].sum() == 3  # every ok job is in the comparison


def test_report_on_a_corrupt_metrics_table_is_an_error_and_rewrites_nothing(transfer, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("")
    code, _, err = transfer("report", str(run))
    assert code == 2 and "is empty or not a CSV table" in err
    assert (run / "metrics.csv").read_text() == ""
    (run / "metrics.csv").write_text("a,b\n1,2\n")
    code, _, err = transfer("report", str(run))
    assert code == 2 and "missing columns" in err and (run / "metrics.csv").read_text() == "a,b\n1,2\n"


def test_a_sweep_records_a_diverged_job_and_exits_1(transfer, tmp_path):
    code, _, err = transfer("sweep", "optimizer=sgd", "optimizer.lr=1e6,0.01", "trainer.epochs=1",
                            "hydra.sweep.dir=s", *QUICK)
    assert code == 1 and "diverged" in err
    table = pd.read_csv(tmp_path / "s" / "sweep.csv")
    assert table["status"].tolist() == ["diverged", "ok"]


def test_a_linear_probe_without_a_validation_split_trains_and_l2_auto_refuses(transfer, tmp_path):
    """dataset.val_fraction=0 leaves an empty val split: the probe caches no features for it (instead of failing
    inside torch.cat), keeps its last epoch, and l2=auto, which has nothing to choose on, says so."""
    code, out, err = transfer("train", "method=linear_probe", "method.l2=0.01", "dataset.val_fraction=0",
                              "trainer.epochs=2", "hydra.run.dir=probe", *QUICK)
    assert code == 0, err
    summary = json.loads((tmp_path / "probe" / "summary.json").read_text())
    assert summary["test"]["acc1"] > 50 and "no validation split" in " ".join(out.split())
    code, _, err = transfer("train", "method=linear_probe", "dataset.val_fraction=0", "hydra.run.dir=auto", *QUICK)
    assert code == 2 and "method.l2=auto (the linear probe's default) chooses" in " ".join(err.split())
    assert not (tmp_path / "auto" / "checkpoints").exists()
    code, _, err = transfer("eval", "checkpoint=probe/checkpoints/best.safetensors", "split=val")
    assert code == 2 and "split=val: dataset=digits has no val samples here" in " ".join(err.split())


def test_eval_applies_dataset_keys_over_the_checkpoints_dataset_and_refuses_leaky_splits(transfer, tmp_path,
                                                                                          digits_5to9):
    """Without dataset=NAME a dataset.KEY=VALUE changes the checkpoint's own dataset; a split carved another way
    than in training would score samples the model trained on, so that is refused."""
    code, out, err = transfer("eval", f"checkpoint={digits_5to9}", "dataset.classes=[9,8,7,6,5]", "hydra.run.dir=r")
    assert code == 0 and "matched by name" in out, err
    for change, split in (("dataset.split_seed=1", "test"), ("dataset.test_fraction=0.3", "test"),
                          ("dataset.val_fraction=0.3", "val")):
        code, _, err = transfer("eval", f"checkpoint={digits_5to9}", change, f"split={split}", "hydra.run.dir=leak")
        assert code == 2 and "would hold samples the model trained on" in " ".join(err.split()), (change, err)
    assert not (tmp_path / "leak" / "eval.csv").exists()
    code, _, err = transfer("eval", f"checkpoint={digits_5to9}", "dataset.bogus=1")
    assert code == 2 and "dataset.bogus: there is no option 'bogus'" in err
    code, _, err = transfer("eval", f"checkpoint={digits_5to9}", "dataset.val_fraction=abc")
    assert code == 2 and "dataset.val_fraction='abc' does not fit" in err
    code, _, err = transfer("eval", f"checkpoint={digits_5to9}", "split=train", "dataset.val_fraction=1.5")
    assert code == 2 and "dataset.val_fraction=1.5 is not allowed" in err  # the training ranges apply here too
