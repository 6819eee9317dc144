"""Weights beyond plain SGD: LoRA (merged into checkpoints), EMA / SWA during training, and weight-space
fusion in `transfer eval` (WiSE-FT, uniform and greedy soups)."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import DEBUG, invoke, train_in_process
from safetensors.torch import load_file

from transfer_cli.config import DatasetConfig, HeadConfig
from transfer_cli.engine.averaging import WeightAverage
from transfer_cli.engine.device import Precision
from transfer_cli.engine.loop import State
from transfer_cli.errors import UserError
from transfer_cli.methods.base import METHODS
from transfer_cli.models.checkpoint import load_model
from transfer_cli.models.fusion import weighted_average
from transfer_cli.pipeline import build_data, build_image_model, make_loader

CPU = torch.device("cpu")
FAST = [DEBUG, "trainer.epochs=3", "dataset.image_size=16"]


def digits_model(backbone: str = "small_cnn", size: int = 16):
    torch.manual_seed(0)
    cfg = DatasetConfig(name="digits", batch_size=32, image_size=size)
    splits = build_data(cfg)
    return cfg, splits, build_image_model(cfg, splits, backbone, "none", HeadConfig())


def lora(model, **settings):
    pytest.importorskip("peft", reason="method=lora needs the [peft] extra (make install installs it)")
    cfg = {"name": "lora", "rank": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": "auto", "bn": "train",
           "label_smoothing": 0.0, **settings}
    return METHODS.build(cfg, model=model)


# -- LoRA -----------------------------------------------------------------------------------------------
def test_lora_trains_only_adapters_and_head_and_its_merged_weights_compute_the_same_function():
    cfg, splits, model = digits_model("mobilenet_v2")
    method = lora(model)
    trainable = {n for n, p in method.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable)
    about = method.describe()
    assert about["lora_layers"] == 34  # MobileNetV2's pointwise convolutions (its body has no linear layer)
    assert about["params_trainable"] / about["params_total"] < 0.05
    with torch.no_grad():  # a trained B (non-zero) so the merge has something to add
        for name, p in method.model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    x = next(iter(make_loader(splits.test, model.spec, cfg, False, CPU)))[0][:8]
    method.eval()
    with torch.no_grad():
        adapted = method.model(x)
        plain = build_image_model(cfg, splits, "mobilenet_v2", "none", HeadConfig()).eval()
        plain.load_state_dict(method.plain_state())
        assert torch.allclose(plain(x), adapted, atol=1e-4)
        method.load_plain_state(method.plain_state())  # bases take the merge, updates restart at zero
        assert torch.allclose(method.model(x), adapted, atol=1e-4)
        assert all(p.abs().sum() == 0 for n, p in method.model.named_parameters() if ".lora_B." in n)


def test_lora_auto_targets_every_attention_and_mlp_projection_of_a_timm_vit():
    cfg = DatasetConfig(name="digits", image_size=224)
    model = build_image_model(cfg, build_data(cfg), "timm/vit_tiny_patch16_224", "none", HeadConfig())
    method = lora(model, rank=4)
    assert len(method.targets) == 12 * 4  # 12 blocks x (qkv, proj, fc1, fc2)
    assert {t.split(".", 2)[2] for t in method.targets} == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    about = method.describe()
    assert about["params_trainable"] / about["params_total"] < 0.03


def test_lora_target_modules_by_suffix_and_regex_and_a_clear_error_when_nothing_matches():
    _, _, model = digits_model("lenet", 32)
    assert lora(model, target_modules="auto").targets == ["fc.f6"]  # the body's one linear layer
    _, _, model = digits_model("lenet", 32)
    assert lora(model, target_modules=["f6", "c5"]).targets == ["convnet.c5", "fc.f6"]
    _, _, model = digits_model("lenet", 32)
    assert lora(model, target_modules=r"convnet\.c\d").targets == ["convnet.c1", "convnet.c3", "convnet.c5"]
    _, _, model = digits_model("lenet", 32)
    with pytest.raises(UserError, match="peft cannot put LoRA on the selected layers"):
        lora(model, target_modules="fc")  # a Sequential, not a layer
    _, _, model = digits_model("lenet", 32)
    with pytest.raises(UserError, match=r"method.target_modules='attn\.qkv' selects no layer of backbone=lenet"):
        lora(model, target_modules="attn.qkv")


def test_lora_run_writes_a_plain_checkpoint_that_eval_reproduces(transfer, tmp_path):
    pytest.importorskip("peft")
    code, out, err = transfer("train", "method=lora", "optimizer.lr=0.01", *FAST, "hydra.run.dir=run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["lora_layers"] >= 1 and summary["params_trainable"] < summary["params_total"]
    model, _ = load_model(str(tmp_path / "run" / "checkpoints" / "best.safetensors"))  # no LoRA code needed
    assert not any("lora" in k for k in model.state_dict())
    code, out, err = transfer("eval", "checkpoint=run/checkpoints/best.safetensors", "hydra.run.dir=ev")
    assert code == 0, err
    assert pd.read_csv(tmp_path / "ev" / "eval.csv")["acc1"].iloc[0] == pytest.approx(summary["test"]["acc1"])


# -- EMA / SWA ------------------------------------------------------------------------------------------
def test_ema_follows_the_warmed_up_decay_and_swa_is_the_plain_mean():
    _, _, model = digits_model()
    ema = WeightAverage(model, 0.9, None, None, CPU, Precision("32", CPU))
    swa = WeightAverage(model, None, 1, None, CPU, Precision("32", CPU))
    weight = next(model.parameters())
    values = [torch.full_like(weight, float(v)) for v in (1.0, 3.0, 8.0)]
    expected_ema, expected_swa = None, []
    for k, value in enumerate(values):
        with torch.no_grad():
            weight.copy_(value)
        ema.update(model)
        swa.update(model)
        keep = min(0.9, (1 + k) / (10 + k))  # k updates so far
        expected_ema = value if expected_ema is None else keep * expected_ema + (1 - keep) * value
        expected_swa.append(value)
    assert torch.allclose(next(ema.averaged.module.parameters()), expected_ema)
    assert torch.allclose(next(swa.averaged.module.parameters()), torch.stack(expected_swa).mean(0))


def test_averaged_weights_are_swapped_in_only_while_evaluated():
    _, _, model = digits_model()
    average = WeightAverage(model, 0.5, None, None, CPU, Precision("32", CPU))
    average.update(model)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in average.averaged.module.parameters():
            p.add_(1.0)
    state = State(method=type("M", (), {"model": model})(), optimizer=None, scheduler=None, max_epochs=1,
                  steps_per_epoch=1)
    with average.applied(state):
        assert torch.allclose(model.state_dict()["head.0.weight"], live["head.0.weight"] + 1.0)
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())


AVERAGED = [*FAST, "trainer.epochs=4", "trainer.deterministic=true", "trainer.threads=1"]


@pytest.fixture(scope="module")
def plain_metrics(tmp_path_factory) -> pd.DataFrame:
    """The metrics of the run the averaged runs are compared with: the same settings, no average."""
    folder = tmp_path_factory.mktemp("plain")
    assert invoke("train", *AVERAGED, "hydra.run.dir=plain", cwd=folder).returncode == 0
    return pd.read_csv(folder / "plain" / "metrics.csv")


# SWA in the full run only: the same swap-in and checkpoint path as EMA, with another average
@pytest.mark.parametrize("setting", ["trainer.ema_decay=0.8", pytest.param("trainer.swa_start=2", marks=pytest.mark.slow)])
def test_averaging_leaves_training_untouched_and_checkpoints_the_average(transfer, tmp_path, setting, plain_metrics):
    code, _, err = transfer("train", *AVERAGED, setting, "hydra.run.dir=avg")
    assert code == 0, err
    plain, avg = plain_metrics, pd.read_csv(tmp_path / "avg" / "metrics.csv")
    train = ["epoch", "loss", "acc1"]
    pd.testing.assert_frame_equal(plain[plain.split == "train"][train], avg[avg.split == "train"][train])
    assert not plain[plain.split == "val"]["acc1"].equals(avg[avg.split == "val"]["acc1"])
    summary = json.loads((tmp_path / "avg" / "summary.json").read_text())
    assert summary["weight_average"]["updates"] >= 3
    # the best checkpoint is the averaged model: evaluating it reproduces the run's test accuracy
    assert transfer("eval", "checkpoint=avg/checkpoints/best.safetensors", "hydra.run.dir=ev")[0] == 0
    assert pd.read_csv(tmp_path / "ev" / "eval.csv")["acc1"].iloc[0] == pytest.approx(summary["test"]["acc1"])


@pytest.mark.parametrize(("args", "message"), [
    (["trainer.ema_decay=1.0"], "trainer.ema_decay=1.0"),
    (["trainer.ema_decay=0.9", "trainer.swa_start=2"], "both set"),
    (["trainer.swa_start=9"], "trainer.swa_start=9"),
    (["trainer.swa_start=0"], "trainer.swa_start=0"),
    (["method=linear_probe", "trainer.ema_decay=0.9"], "fits its weights in one solve"),
    (["trainer.steps=3", "trainer.swa_start=2"], "past the run's last epoch"),
])
def test_averaging_settings_that_make_no_sense_are_refused(transfer, args, message):
    code, _, err = transfer("train", *FAST, *args)
    assert code == 2 and message in err


# -- weight-space fusion --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """Two fine-tuned seeds and a linear probe of small_cnn on digits (BatchNorm in the body)."""
    root = tmp_path_factory.mktemp("fusion")
    for name, extra in (("ft0", ["seed=0"]), ("ft1", ["seed=1"]), ("probe", ["method=linear_probe"])):
        train_in_process(root / "runs" / name, *FAST, *extra, f"output_dir={root}")
    return root


def best(root: Path, name: str) -> Path:
    return root / "runs" / name / "checkpoints" / "best.safetensors"


def test_wise_ends_are_the_two_checkpoints_and_the_chosen_alpha_is_best_on_val(transfer, three_runs, tmp_path):
    a, b = best(three_runs, "probe"), best(three_runs, "ft0")
    code, _, err = transfer("eval", f"checkpoint=[{a},{b}]", "fusion=wise", "fusion.alphas=[0,0.5,1]",
                            "fusion.recompute_bn=false", "hydra.run.dir=w")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "w" / "eval.csv")
    assert table["alpha"].tolist() == [0, 0.5, 1] and table["chosen"].sum() == 1
    ends = [json.loads((three_runs / "runs" / n / "summary.json").read_text())["test"]["acc1"] for n in ("probe", "ft0")]
    assert table["acc1"].iloc[[0, 2]].tolist() == pytest.approx(ends)
    chosen = table[table["chosen"]].iloc[0]
    assert chosen["val_acc1"] == table["val_acc1"].max() and (tmp_path / "w" / "wise.png").stat().st_size > 0
    # the fused model is a checkpoint like any other
    assert transfer("eval", "checkpoint=w/fused.safetensors", "hydra.run.dir=again")[0] == 0
    assert pd.read_csv(tmp_path / "again" / "eval.csv")["acc1"].iloc[0] == pytest.approx(chosen["acc1"])


def test_soups_over_a_folder_recompute_differing_batchnorm_and_greedy_never_loses_on_val(transfer, three_runs, tmp_path):
    code, out, err = transfer("eval", f"checkpoint={three_runs / 'runs'}", "fusion=greedy_soup", "hydra.run.dir=g")
    assert code == 0, err
    assert "BatchNorm statistics of" in out
    table = pd.read_csv(tmp_path / "g" / "eval.csv")
    members = table[table["members"] == 1].head(3)
    assert len(members) == 3 and members["model"].str.contains("seed=").all()
    final = table.iloc[-1]
    assert final["chosen"] and final["val_acc1"] >= members["val_acc1"].max()
    code, _, err = transfer("eval", f"checkpoint=[{best(three_runs, 'ft0')},{best(three_runs, 'ft1')}]",
                            "fusion=soup", "hydra.run.dir=u")
    assert code == 0, err
    soup = pd.read_csv(tmp_path / "u" / "eval.csv")
    assert soup["model"].tolist()[-1] == "uniform soup of 2" and len(soup) == 3


def test_a_soup_of_a_folder_leaves_out_runs_that_did_not_finish(transfer, three_runs, tmp_path):
    import shutil

    folder = shutil.copytree(three_runs / "runs", tmp_path / "runs", ignore=shutil.ignore_patterns("probe"))
    shutil.copytree(folder / "ft1", folder / "killed")
    (folder / "killed" / "summary.json").unlink()  # a job killed mid-run: its best.safetensors is no result
    code, out, err = transfer("eval", f"checkpoint={folder}", "fusion=soup", "hydra.run.dir=s")
    assert code == 0, err
    assert "1 run(s) below it did not finish and are left out" in " ".join(out.split())
    assert pd.read_csv(tmp_path / "s" / "eval.csv")["model"].tolist()[-1] == "uniform soup of 2"


def test_weighted_average_of_identical_states_is_the_state():
    _, _, model = digits_model()
    state = model.state_dict()
    out = weighted_average([state, state], [0.3, 0.7])
    assert all(torch.allclose(out[k].float(), state[k].float()) for k in state)


@pytest.mark.parametrize(("args", "message"), [
    (["fusion=wise"], "fusion=wise interpolates two checkpoints"),
    (["fusion=wise", "fusion.alphas=[0,1.5]"], "fusion.alphas"),
])
def test_fusion_mistakes_exit_2(transfer, three_runs, args, message):
    paths = [best(three_runs, n) for n in ("probe", "ft0", "ft1")]
    chosen = paths if "fusion.alphas=[0,1.5]" not in args else paths[:2]
    code, _, err = transfer("eval", f"checkpoint=[{','.join(map(str, chosen))}]", *args)
    assert code == 2 and message in err


def test_fusion_refuses_checkpoints_of_different_architectures(transfer, three_runs, tmp_path):
    assert transfer("train", *FAST, "backbone=lenet", "dataset.image_size=32", "hydra.run.dir=lenet")[0] == 0
    code, _, err = transfer("eval", f"checkpoint=[{best(three_runs, 'ft0')},lenet/checkpoints/best.safetensors]",
                            "fusion=soup")
    assert code == 2 and "weight-space fusion needs checkpoints of one architecture" in err


def test_a_folder_without_checkpoints_is_a_clear_error(transfer, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = transfer("eval", "checkpoint=empty")
    assert code == 2 and "without any checkpoints/best.safetensors" in err


def test_fused_states_load_into_the_plain_architecture(three_runs):
    states = [load_file(str(best(three_runs, n))) for n in ("ft0", "ft1")]
    model, _ = load_model(str(best(three_runs, "ft0")))
    model.load_state_dict(weighted_average(states, [0.5, 0.5]))
