"""backbone.cut=k: a body cut after its k-th stage computes what the whole network computes there, holds only
those stages' parameters, trains, checkpoints, reloads and ranks like any backbone."""

import json

import pandas as pd
import pytest
import torch
from conftest import train_in_process

from transfer_cli.errors import UserError
from transfer_cli.models.backbone import build_backbone
from transfer_cli.models.recipe import ModelRecipe
from transfer_cli.models.stages import in_stage


def _pooled_output_of(body: torch.nn.Module, module: str, x: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = body.get_submodule(module).register_forward_hook(lambda m, i, out: seen.update(out=out))
    with torch.no_grad():
        body(x)
    handle.remove()
    out = seen["out"]
    return out.mean(1) if out.dim() == 3 else out.flatten(2).mean(2)  # tokens, or a spatial map


@pytest.mark.parametrize("name, cut, module", [("resnet18", 3, "layer2"), ("timm/resnet18", 4, "layer3"),
                                               ("mobilenet_v2", 5, "features.4"),
                                               ("timm/vit_tiny_patch16_224", 3, "blocks.1")])
def test_a_cut_body_gives_the_pooled_output_of_its_last_stage_and_holds_only_its_stages(name, cut, module):
    pytest.importorskip("timm") if name.startswith("timm/") else None
    torch.manual_seed(0)
    full = build_backbone(name, "none", 3)
    full.body.eval()
    kept_stages = full.stages[:cut]
    size = full.fixed_size or 64
    cut_bb = build_backbone(name, "none", 3).cut(cut, size)
    cut_bb.body.load_state_dict({f"trunk.{k}": v for k, v in full.body.state_dict().items()
                                 if f"trunk.{k}" in cut_bb.body.state_dict()})
    cut_bb.body.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        got = cut_bb.body(x)
    torch.testing.assert_close(got, _pooled_output_of(full.body, module, x))
    assert cut_bb.feature_dim == got.shape[1]
    kept = {n.removeprefix("trunk.") for n, _ in cut_bb.body.named_parameters()}
    expected = {n for n, _ in full.body.named_parameters() if any(in_stage(n, s) for s in kept_stages)}
    assert kept == expected  # every parameter of the first stages, none of the later ones
    assert len(cut_bb.stages) == cut and cut_bb.source_head is None


def test_a_vit_cut_drops_the_later_blocks_that_shape_checks_would_keep():
    full = build_backbone("vit_b_16", "none", 3)
    per_block = sum(p.numel() for p in full.body.encoder.layers[0].parameters())
    cut = build_backbone("vit_b_16", "none", 3).cut(3, 224)  # patch embedding + 2 blocks
    stem = sum(p.numel() for n, p in full.body.named_parameters() if in_stage(n, full.stages[0]))
    assert sum(p.numel() for p in cut.body.parameters()) == stem + 2 * per_block
    assert cut.feature_dim == 768


def test_out_of_range_cuts_list_the_stages():
    with pytest.raises(UserError, match=r"backbone.cut=3 .* k from 1 to 2 .*Stages: 1: block1; 2: block2; 3: block3"):
        build_backbone("small_cnn", "none", 1).cut(3, 8)


def test_a_cut_model_trains_checkpoints_and_evaluates_to_the_same_number(tmp_path, transfer):
    run = tmp_path / "run"
    summary = train_in_process(run, "backbone.cut=2", "method.freeze=1")
    sidecar = json.loads((run / "checkpoints" / "best.json").read_text())
    assert sidecar["recipe"]["cut"] == 2
    assert summary["params_total"] < 60_000  # small_cnn's third block (73k parameters) is gone
    code, out, err = transfer("eval", f"checkpoint={run}/checkpoints/best.safetensors")
    assert code == 0, err
    evaluated = pd.read_csv(next((tmp_path / "outputs" / "evals").glob("*/eval.csv")))
    assert evaluated["acc1"].iloc[0] == pytest.approx(summary["test"]["acc1"], abs=1e-9)
    assert summary["test"]["acc1"] > 80


def test_recipes_written_before_cuts_existed_read_as_whole_bodies():
    raw = {"backbone": "small_cnn", "weights": "none", "data_channels": 1, "classes": ["a", "b"],
           "input": {"channels": 1, "size": 8, "resize": None, "mean": [0.0], "std": [1.0]},
           "head": {"hidden": [], "dropout": 0.0}}
    assert ModelRecipe.from_dict(raw, "old").cut is None
    with pytest.raises(UserError, match=r"recipe.cut=0 .*null, or an integer >= 1"):
        ModelRecipe.from_dict({**raw, "cut": 0}, "bad")


def test_rank_scores_cuts_as_candidates_with_their_own_rows(transfer, tmp_path):
    code, out, err = transfer("rank", "candidates=[small_cnn,{name:small_cnn,cut:1},{name:small_cnn,cut:5}]",
                              "bootstrap=0", "scores=[knn,logme]")
    assert code == 0, err
    assert "(best logme)" in out  # recommend=auto without the probe: LogME, the next best measured
    table = pd.read_csv(next((tmp_path / "outputs" / "ranks").glob("*/rank.csv")))
    assert list(table["candidate"]) == ["small_cnn (none)", "small_cnn (none, cut 1)", "small_cnn (none, cut 5)"]
    assert list(table["feature_dim"].iloc[:2]) == [128, 32]
    assert table["logme"].iloc[:2].notna().all() and table["logme"].iloc[0] != table["logme"].iloc[1]
    assert "backbone.cut=5 is not allowed" in table["error"].iloc[2]


def test_text_backbones_refuse_a_cut(transfer, tmp_path):
    table = tmp_path / "texts.jsonl"
    table.write_text("\n".join(json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) for i in range(40)) + "\n")
    code, _, err = transfer("train", "dataset=csv_text", f"dataset.root={table}", "backbone=tfidf", "backbone.cut=1",
                            "trainer=debug")
    assert code == 2 and "backbone.cut=1" in err and "pool_layers" in err
