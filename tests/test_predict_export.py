"""`transfer predict` on unlabelled files and `transfer export` to ONNX / TorchScript, checked on real images."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import train_in_process
from PIL import Image
from sklearn.datasets import load_digits

SHORT = ["dataset.image_size=32", "trainer.epochs=1", "dataset.fraction=0.1", "dataset.val_fraction=0.05"]


class Runs:
    """small_cnn on digits (two seeds), and resnet18 / mobilenet_v2 (random init, one epoch on a tenth of the
    training images at 32 px: export is checked against PyTorch, not for accuracy); each trained when a test
    first asks for it, so the fast tier (which exports small_cnn only) never trains the large ones."""

    SETTINGS = {"cnn0": ["seed=0"], "cnn1": ["seed=1"], "resnet18": ["backbone=resnet18", *SHORT],
                "mobilenet_v2": ["backbone=mobilenet_v2", *SHORT]}

    def __init__(self, root: Path) -> None:
        self.root = root

    def best(self, name: str) -> str:
        folder = self.root / name
        if not (folder / "summary.json").is_file():
            train_in_process(folder, "trainer.epochs=3", *self.SETTINGS[name], f"output_dir={self.root}")
        return str(folder / "checkpoints" / "best.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"))


def best(runs: Runs, name: str) -> str:
    return runs.best(name)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """40 digit images as PNG files (sizes 8 and 24 px) in nested folders, plus two files that are not images."""
    root = tmp_path_factory.mktemp("unlabelled")
    digits = load_digits()
    for i in range(40):
        folder = root / ("a" if i % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8))
        (image.resize((24, 24), Image.NEAREST) if i % 3 == 0 else image).save(folder / f"{i:02d}_{digits.target[i]}.png")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def read(tmp_path: Path, run: str) -> pd.DataFrame:
    return pd.read_csv(tmp_path / run / "predictions.csv")


def test_predict_lists_every_file_ranks_top_k_and_reports_bad_files(transfer, runs, photos, tmp_path):
    code, out, err = transfer("predict", f"checkpoint={best(runs, 'cnn0')}", f"input={photos}", "top_k=10",
                              "hydra.run.dir=p")
    assert code == 0, err
    table = read(tmp_path, "p")
    assert len(table) == 42 and table["error"].notna().sum() == 2
    bad = table[table["error"].notna()]
    assert {Path(p).name for p in bad["path"]} == {"notes.txt", "broken.png"} and bad["predicted"].isna().all()
    good = table[table["error"].isna()]
    probs = good[[f"top{i}_prob" for i in range(1, 11)]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4) and (np.diff(probs, axis=1) <= 1e-7).all()
    assert (good["predicted"] == good["top1"]).all() and (good["probability"] == good["top1_prob"]).all()
    truth = [int(Path(p).stem.split("_")[1]) for p in good["path"]]
    assert (good["predicted"].astype(int).to_numpy() == truth).mean() > 0.8  # digits the model was trained on
    assert "(not an image / unreadable)" in out and "2 file(s) could not be read" in out


def test_predict_takes_globs_and_path_lists_and_refuses_an_input_that_matches_nothing(transfer, runs, photos, tmp_path):
    checkpoint = f"checkpoint={best(runs, 'cnn0')}"
    assert transfer("predict", checkpoint, f"input={photos}/**/*.png", "hydra.run.dir=g")[0] == 0
    assert len(read(tmp_path, "g")) == 41  # every .png, the broken one included
    listing = tmp_path / "list.csv"
    pngs = sorted(photos.rglob("0*.png"))
    listing.write_text("path,comment\n" + "".join(f"{p.relative_to(tmp_path) if p.is_relative_to(tmp_path) else p},x\n"
                                                  for p in pngs))
    assert transfer("predict", checkpoint, f"input={listing}", "top_k=2", "hydra.run.dir=l")[0] == 0
    listed = read(tmp_path, "l")
    assert len(listed) == len(pngs) and "top3" not in listed and listed["error"].isna().all()
    code, _, err = transfer("predict", checkpoint, f"input={tmp_path}/nothing/*.jpg")
    assert code == 2 and "matches no file" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("not an image")
    code, _, err = transfer("predict", checkpoint, f"input={tmp_path / 'junk'}", "hydra.run.dir=j")
    assert code == 2 and "none of its 1 file(s) is a readable image" in err
    assert read(tmp_path, "j")["error"].notna().all()  # the reasons are still written
    code, _, err = transfer("predict", checkpoint, f"input={photos}", "top_k=0")
    assert code == 2 and "top_k=0" in err


def test_ensemble_predict_averages_the_members_probabilities(transfer, runs, photos, tmp_path):
    members = [best(runs, "cnn0"), best(runs, "cnn1")]
    for i, member in enumerate(members):
        assert transfer("predict", f"checkpoint={member}", f"input={photos}/a", "top_k=10", f"hydra.run.dir=m{i}")[0] == 0
    assert transfer("predict", f"checkpoint=[{','.join(members)}]", f"input={photos}/a", "top_k=10", "hydra.run.dir=e")[0] == 0
    singles, fused = [read(tmp_path, f"m{i}") for i in range(2)], read(tmp_path, "e")
    ok = fused["error"].isna()

    def prob_of(table: pd.DataFrame, cls: str) -> np.ndarray:
        return np.array([row[f"top{j}_prob"] for _, row in table[ok].iterrows() for j in range(1, 11)
                         if str(row[f"top{j}"]) == cls])

    for cls in ("0", "7"):
        assert np.allclose(prob_of(fused, cls), (prob_of(singles[0], cls) + prob_of(singles[1], cls)) / 2, atol=1e-5)


# resnet18 and mobilenet_v2 are slow (a model of millions of weights trained, exported, quantised): the
# full suite keeps one round trip per architecture family, the fast tier the small CNN's.
@pytest.mark.parametrize("backbone", ["cnn0", pytest.param("resnet18", marks=pytest.mark.slow),
                                      pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
def test_onnx_export_matches_pytorch_on_real_images_and_predicts_the_same(transfer, runs, photos, tmp_path, backbone):
    pytest.importorskip("onnxruntime", reason="ONNX export needs the [export] extra (make install installs it)")
    code, _, err = transfer("export", f"checkpoint={best(runs, backbone)}", "quantize=dynamic", "samples=64",
                            "repeats=2", "hydra.run.dir=x")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "x" / "export.csv")
    assert table["model"].tolist() == ["pytorch (eager)", "onnx (opset 18)", "onnx dynamic int8"]
    exported = table.iloc[1]
    assert exported["top1_agreement"] == 100.0 and exported["max_abs_logit_diff"] < 1e-4
    assert exported["images"] == 64 and (table["ms_per_image_b1"] > 0).all() and (table["file_mb"] > 0).all()
    assert 0 <= table.iloc[2]["top1_agreement"] <= 100  # int8: reported, not promised
    if backbone != "cnn0":
        return
    assert table.iloc[2]["file_mb"] < exported["file_mb"]  # int8 weights are smaller
    for run, checkpoint in (("pt", best(runs, backbone)), ("onnx", str(tmp_path / "x" / "model.onnx"))):
        assert transfer("predict", f"checkpoint={checkpoint}", f"input={photos}", "hydra.run.dir=" + run)[0] == 0
    torch_rows, onnx_rows = read(tmp_path, "pt"), read(tmp_path, "onnx")
    assert torch_rows["predicted"].fillna("-").equals(onnx_rows["predicted"].fillna("-"))
    assert np.allclose(torch_rows["probability"].fillna(0), onnx_rows["probability"].fillna(0), atol=1e-5)


def test_torchscript_export_round_trips(transfer, runs, tmp_path):
    code, _, err = transfer("export", f"checkpoint={best(runs, 'cnn0')}", "format=torchscript", "samples=64",
                            "repeats=2", "hydra.run.dir=t")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "t" / "export.csv")
    assert table.iloc[1]["model"] == "torchscript" and table.iloc[1]["top1_agreement"] == 100.0
    assert table.iloc[1]["max_abs_logit_diff"] < 1e-4 and (tmp_path / "t" / "model.json").is_file()


def test_static_int8_is_calibrated_on_train_images_and_reported_next_to_dynamic(transfer, runs, tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX export needs the [export] extra (make install installs it)")
    code, _, err = transfer("export", f"checkpoint={best(runs, 'cnn0')}", "quantize=static", "calibration=64",
                            "samples=128", "repeats=2", "hydra.run.dir=s")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "s" / "export.csv").set_index("model")
    static = table.loc["onnx static int8 (64 train images)"]
    assert list(table.index[1:3]) == ["onnx (opset 18)", "onnx dynamic int8"]
    assert static["top1_agreement"] >= 95 and abs(static["acc1"] - table.loc["onnx (opset 18)", "acc1"]) <= 3
    assert static["file_mb"] < table.loc["onnx (opset 18)", "file_mb"] and static["max_abs_logit_diff"] > 0
    assert not list((tmp_path / "s").glob("*prepared*"))  # the pre-processed copy is not left behind


@pytest.mark.parametrize(("args", "message"), [
    (["format=tflite"], "format='tflite'"),
    (["quantize=float8"], "quantize='float8'"),
    (["quantize=static", "format=torchscript"], "quantize='static' is not allowed. Allowed: none or dynamic with"),
    (["quantize=static", "calibration=0"], "calibration=0 is not allowed"),
    (["opset=9"], "opset=9"),
])
def test_export_refuses_unknown_choices(transfer, runs, args, message):
    code, _, err = transfer("export", f"checkpoint={best(runs, 'cnn0')}", *args)
    assert code == 2 and message in err
