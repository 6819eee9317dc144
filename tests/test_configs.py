"""Every YAML of every config group composes against the schemas and passes validation."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from transfer_cli.cli import conf_dir
from transfer_cli.errors import UserError
from transfer_cli.methods.base import METHODS
from transfer_cli.validation import validate

GROUPS = ["dataset", "source", "target", "backbone", "method", "optimizer", "scheduler", "trainer", "experiment",
          "sweep"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((conf_dir() / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


def _registered(method_option: str) -> str:
    """The registered method a conf/method file builds (a preset such as cdan_e_mcc names another)."""
    return OmegaConf.load(conf_dir() / "method" / f"{method_option}.yaml").name


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_validates(compose_cfg, group, option):
    overrides = [f"{group}={option}"]
    if group == "dataset" and option == "imagefolder":
        overrides.append("dataset.root=somewhere")
    if group == "method" and METHODS.get(_registered(option)).needs_target_data:
        overrides.append("target=usps")
    if group == "method" and option == "distill":
        overrides.append("method.teacher=teacher.safetensors")  # the one key its YAML leaves to the user
    cfg = compose_cfg(*overrides)
    validate(cfg)
    if group in ("dataset", "backbone", "method", "optimizer", "scheduler"):
        assert cfg[group].name == OmegaConf.load(Path(conf_dir() / group / f"{option}.yaml")).name
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_eval_config_composes_with_and_without_dataset(compose_cfg):
    cfg = compose_cfg("checkpoint=x.safetensors", config_name="eval")
    assert cfg.dataset is None and cfg.split == "test"
    cfg = compose_cfg("checkpoint=x.safetensors", "dataset=usps", "dataset.root=r", config_name="eval")
    assert cfg.dataset.name == "usps" and cfg.dataset.root == "r"


def test_experiment_overrides_only_what_it_names(compose_cfg):
    cfg = compose_cfg("experiment=digits_resnet18")
    assert cfg.backbone.name == "resnet18" and cfg.method.freeze == 2 and cfg.trainer.epochs == 3
    assert cfg.dataset.name == "digits" and cfg.optimizer.name == "adamw"


@pytest.mark.parametrize("override, message", [
    ("trainer.precision=fp8", r"trainer.precision='fp8' is not allowed. Allowed: 32, bf16-mixed, 16-mixed"),
    ("trainer.device=tpu", r"trainer.device='tpu' is not allowed"),
    ("dataset.augment=mixup", r"dataset.augment='mixup' is not allowed. Allowed: none, flip_crop"),
    ("dataset.val_fraction=1.5", r"dataset.val_fraction=1.5 is not allowed"),
    ("trainer.epochs=0", r"trainer.epochs=0 is not allowed. Allowed: an integer >= 1"),
    ("backbone.name=resnet19", r"backbone='resnet19' is not a known backbone. Known: alexnet"),
    ("method.bn=maybe", r"method.bn='maybe' is not allowed for method 'finetune'. Allowed: one of auto, train, frozen"),
    ("+optimizer.momentum=0.9", r"optimizer.momentum is not an option of optimizer 'adamw'"),
    ("scheduler=step scheduler.gamma=x", r"scheduler.gamma='x' is not allowed"),
    ("method=dann", r"method=dann adapts to an unlabelled target domain: add target=NAME"),
    ("~optimizer.lr", r"optimizer 'adamw' needs optimizer.lr"),
])
def test_validate_rejects_bad_values_before_any_work(compose_cfg, override, message):
    cfg = compose_cfg(*override.split())
    with pytest.raises(UserError, match=message):
        validate(cfg)
