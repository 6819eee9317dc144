"""Structured-config schemas (types and defaults) registered in Hydra's ConfigStore.

The fixed parts of a run (dataset, backbone, trainer) are dataclasses, so a wrong type or a misspelt
key fails while Hydra composes the config. The open parts (method, optimizer, scheduler) vary per
registry entry; their keys are checked against the registered builder's signature in ``validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from transfer_cli.errors import UserError, bad_value

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
DEVICES = ("auto", "cpu", "cuda", "mps")
AUGMENTS = ("none", "flip_crop", "randaugment", "trivialaugment")
PROGRESS = ("auto", "rich", "plain", "none")


@dataclass
class DatasetConfig:
    name: str = "digits"
    root: str | None = None
    download: bool = False
    val_fraction: float = 0.1  # carved (seeded, stratified) from train when the dataset has no val split
    test_fraction: float = 0.2  # only for datasets that ship without any test split (digits)
    split_seed: int = 0  # carved splits stay the same across training seeds
    classes: list[int] | None = None  # keep these class indices (every split), relabelled 0..k-1 in this order
    shots: int | None = None  # keep this many labelled train examples per class (val/test untouched)
    fraction: float | None = None  # keep this stratified fraction of the train split
    image_size: int | None = None  # None: the weights' crop size, else the data's own size
    augment: str = "none"
    mean: list[float] | None = None  # None: the weights' statistics, else computed on the train split
    std: list[float] | None = None
    batch_size: int = 64
    eval_batch_size: int | None = None
    num_workers: int = 0


@dataclass
class BackboneConfig:
    name: str = "small_cnn"
    weights: str = "none"  # none | DEFAULT | a torchvision weights enum name | a local file


@dataclass
class HeadConfig:
    hidden: list[int] = field(default_factory=list)  # widths of hidden layers; [] is a linear head
    dropout: float = 0.0  # before every linear layer of the head


@dataclass
class TrainerConfig:
    epochs: int = 10
    steps: int | None = None  # when set: train this many optimizer steps (epochs = steps / batches per epoch)
    device: str = "auto"
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = None
    accumulate: int = 1
    deterministic: bool = False
    threads: int | None = None  # CPU threads for torch; None keeps torch's default
    progress: str = "auto"  # auto: rich bars on a terminal, one line per epoch otherwise
    log_every: int = 20
    save_every_s: float = 60.0  # checkpoint cadence: after the first epoch, then at most this often, and at the end
    plots: bool = True


@dataclass
class SourceConfig:
    """The task a backbone is pretrained on when ``backbone.weights=source``."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    epochs: int = 15
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adamw", "lr": 2e-3, "weight_decay": 0.05})
    seed: int = 0
    cache_dir: str = "outputs/cache/source"


@dataclass
class TargetConfig:
    """The target domain of unsupervised domain adaptation: its train split is used without labels,
    its test split (labelled) only for evaluation."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)


@dataclass
class Config:
    name: str = "default"
    seed: int = 0
    output_dir: str = "outputs"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    source: SourceConfig | None = None
    target: TargetConfig | None = None
    method: dict[str, Any] = field(default_factory=lambda: {"name": "finetune"})
    optimizer: dict[str, Any] = field(default_factory=lambda: {"name": "adamw"})
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class EnsembleConfig:
    name: str = "mean"  # mean | weighted | vote: how member predictions are fused
    weights: list[float] | None = None  # weighted: one weight per checkpoint


@dataclass
class EvalConfig:
    checkpoint: Any = "???"  # a path, or a list of paths to evaluate as an ensemble
    split: str = "test"
    output_dir: str = "outputs"
    dataset: DatasetConfig | None = None  # None: the dataset the checkpoint was trained on
    device: str = "auto"
    precision: str = "32"
    batch_size: int = 256
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="eval_schema", node=EvalConfig)


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise bad_value(key, value, allowed)


def validate(cfg: DictConfig) -> None:
    """Everything Hydra's schema cannot express; runs before any data or model is touched."""
    from transfer_cli import registries

    check_choice("trainer.precision", str(cfg.trainer.precision), PRECISIONS)
    check_choice("trainer.device", cfg.trainer.device, DEVICES)
    check_choice("trainer.progress", cfg.trainer.progress, PROGRESS)
    check_choice("dataset.augment", cfg.dataset.augment, AUGMENTS)
    for key, minimum in (("trainer.epochs", 1), ("trainer.accumulate", 1), ("dataset.batch_size", 1)):
        value = OmegaConf.select(cfg, key)
        if value < minimum:
            raise bad_value(key, value, f"an integer >= {minimum}")
    if not 0.0 <= cfg.dataset.val_fraction < 1.0:
        raise bad_value("dataset.val_fraction", cfg.dataset.val_fraction, "a fraction in [0, 1)")
    registries.DATASETS.get(cfg.dataset.name)
    if cfg.target is not None:
        registries.DATASETS.get(cfg.target.dataset.name)
    if cfg.backbone.weights == "source":
        if cfg.source is None:
            raise UserError("backbone.weights=source needs a source task to pretrain on: add source=NAME "
                            "(e.g. source=digits_0to4) or a source: block.")
        registries.DATASETS.get(cfg.source.dataset.name)
        registries.OPTIMIZERS.check(cfg.source.optimizer, provided=("params",))
    registries.BACKBONES.get(cfg.backbone.name)
    registries.METHODS.check(cfg.method, provided=("model",))
    registries.OPTIMIZERS.check(cfg.optimizer, provided=("params",))
    registries.SCHEDULERS.check(cfg.scheduler, provided=("optimizer", "total_steps", "steps_per_epoch"))
