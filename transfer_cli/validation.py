"""Checks of a composed run config that its schema cannot express; they run before any data or model is
touched, so every mistake ends in one paragraph naming the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from transfer_cli.config import AUGMENTS, PROGRESS, DatasetConfig
from transfer_cli.data.splits import DATASETS
from transfer_cli.data.transforms import INTERPOLATIONS
from transfer_cli.engine.device import AMP_DTYPES, DEVICES
from transfer_cli.engine.selection import SELECTIONS
from transfer_cli.errors import UserError, bad_value, choices
from transfer_cli.methods.base import METHODS
from transfer_cli.models.backbone import BACKBONES
from transfer_cli.optim import AUTO_LR, OPTIMIZERS, SCHEDULERS, optimizer_entry

# key -> (test, what is allowed); None always passes for the optional keys marked "or null"
_RANGES: dict[str, tuple[Any, str]] = {
    "trainer.epochs": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.steps": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "trainer.accumulate": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.devices": (lambda v: v >= 1, "an integer >= 1 (processes on this machine)"),
    "trainer.grad_clip": (lambda v: v is None or (math.isfinite(v) and v > 0), "null or a number > 0"),
    "trainer.threads": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "trainer.log_every": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.save_every_s": (lambda v: math.isfinite(v) and v >= 0, "a number of seconds >= 0"),
    "trainer.ema_decay": (lambda v: v is None or 0 < v < 1, "null (off) or a decay in (0, 1), e.g. 0.999"),
    "trainer.swa_start": (lambda v: v is None or v >= 1, "null (off) or the 1-based epoch where averaging starts"),
    "dataset.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "dataset.eval_batch_size": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "dataset.num_workers": (lambda v: v == "auto" or v.isdigit(), "auto (cores - 1) or an integer >= 0"),
    "dataset.in_memory": (lambda v: v.lower() in ("auto", "true", "false"),
                          "auto (decode once when the images fit in 4 GiB), true or false"),
    "dataset.image_size": (lambda v: v is None or v >= 1, "null or an integer >= 1 (pixels)"),
    "dataset.val_fraction": (lambda v: 0 <= v < 1, "a fraction in [0, 1) (0: no validation split, the last epoch is kept)"),
    "dataset.test_fraction": (lambda v: 0 < v < 1, "a fraction in (0, 1)"),
    "dataset.fraction": (lambda v: v is None or 0 < v <= 1, "null or a fraction in (0, 1]"),
    "dataset.shots": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "dataset.shots_seed": (lambda v: v is None or v >= 0, "null (dataset.split_seed) or an integer >= 0"),
    "dataset.std": (lambda v: v is None or all(math.isfinite(s) and s > 0 for s in v), "null or numbers > 0"),
    "dataset.mean": (lambda v: v is None or all(math.isfinite(m) for m in v), "null or finite numbers"),
    "backbone.preprocess.resize": (lambda v: v is None or v >= 1, "null or an integer >= 1 (pixels)"),
    "backbone.preprocess.crop": (lambda v: v is None or v >= 1, "null or an integer >= 1 (pixels)"),
    "backbone.preprocess.interpolation": (lambda v: v is None or v in INTERPOLATIONS,
                                         f"null or one of {', '.join(INTERPOLATIONS)}"),
    "backbone.preprocess.std": (lambda v: v is None or all(math.isfinite(s) and s > 0 for s in v), "null or numbers > 0"),
    "backbone.preprocess.mean": (lambda v: v is None or all(math.isfinite(m) for m in v), "null or finite numbers"),
    "backbone.in_channels": (lambda v: v is None or v in (1, 3), "null (the data's channels), 1 or 3"),
    "backbone.cut": (lambda v: v is None or v >= 1, "null (the whole body) or an integer >= 1 (stages kept)"),
    "backbone.max_length": (lambda v: v >= 8, "an integer >= 8 (tokens kept per text)"),
    "backbone.pool_layers": (lambda v: v >= 1, "an integer >= 1 (up to the encoder's number of layers)"),
    "backbone.tfidf.ngram_max": (lambda v: 1 <= v <= 5, "an integer from 1 to 5"),
    "backbone.tfidf.min_df": (lambda v: v >= 1, "an integer >= 1 (train texts an n-gram must occur in)"),
    "backbone.tfidf.max_features": (lambda v: v is None or v >= 1, "null (every n-gram) or an integer >= 1"),
    "tracker.wandb.mode": (lambda v: v is None or v in ("offline", "online", "disabled"),
                           "offline (sync later with `wandb sync`), online or disabled"),
    "head.dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "head.hidden": (lambda v: all(w >= 1 for w in v), "a list of layer widths >= 1"),
}


_ABSENT = object()


def check_choice(key: str, value: str, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise bad_value(key, value, allowed)


def check_known_keys(cfg: DictConfig, path: str = "") -> None:
    """Every key of a schema-typed node is a field of its dataclass. Hydra's ``+key=value`` adds keys past
    the struct flag; without this check ``+trainer.epocs=5`` would train with the default epochs."""
    schema = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(schema):
        fields = [f.name for f in dataclasses.fields(schema)]
        for key in cfg:
            if key not in fields:
                full = f"{path}{key}"
                where = path.rstrip(".") or "the top level"
                raise UserError(f"{full}: there is no option {key!r}. Keys under {where}: {choices(fields)}.")
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            check_known_keys(node, f"{path}{key}.")


def _check_ranges(cfg: DictConfig, prefix: str = "") -> None:
    """The ``_RANGES`` keys found in ``cfg`` (the run config, or its ``prefix`` block such as ``source.``)."""
    for key, (ok, allowed) in _RANGES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        value = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
        try:
            good = bool(ok(value))
        except TypeError:
            good = False
        if not good:
            raise bad_value(f"{prefix}{key}", value, allowed)


def check_dataset(data: DatasetConfig) -> None:
    """The dataset.* ranges of a dataset config that ``validate`` never saw: eval's, export's and analyze's
    (the checkpoint's dataset with dataset.KEY changes, a dataset=NAME given to them, or one read back from a
    checkpoint's sidecar)."""
    _check_ranges(OmegaConf.create({"dataset": data}))
    _check_fractions(data.val_fraction, data.test_fraction)


def _check_fractions(val: float, test: float) -> None:
    if val + test >= 1:
        raise UserError(f"dataset.val_fraction={val} and dataset.test_fraction={test} leave no training data: "
                        "their sum must stay below 1.")


def validate_command(cfg: DictConfig) -> None:
    """The keys of eval, predict, export and analyze that their schema types but cannot restrict."""
    check_known_keys(cfg)
    if "precision" in cfg:
        check_choice("precision", str(cfg.precision), list(AMP_DTYPES))
    if "device" in cfg:
        check_choice("device", str(cfg.device), DEVICES)


def validate(cfg: DictConfig) -> None:
    """Everything about a train/sweep config that can be checked without touching data or models."""
    check_known_keys(cfg)
    check_choice("trainer.precision", str(cfg.trainer.precision), list(AMP_DTYPES))
    check_choice("trainer.device", cfg.trainer.device, DEVICES)
    check_choice("trainer.progress", cfg.trainer.progress, PROGRESS)
    check_choice("dataset.augment", cfg.dataset.augment, AUGMENTS)
    check_choice("trainer.select", cfg.trainer.select, SELECTIONS)
    if cfg.trainer.select.startswith("target_") and cfg.target is None:
        raise UserError(f"trainer.select={cfg.trainer.select} scores checkpoints on an unlabelled target domain, "
                        "but this run has none: add target=NAME, or select by val_acc1 or last.")
    if cfg.trainer.analyze and cfg.target is None:
        raise UserError("trainer.analyze=true compares the source and target domains' features, but this run has "
                        "no target domain: add target=NAME, or set trainer.analyze=false.")
    _check_ranges(cfg)
    _check_fractions(cfg.dataset.val_fraction, cfg.dataset.test_fraction)
    DATASETS.get(cfg.dataset.name)
    if cfg.target is not None:
        DATASETS.get(cfg.target.dataset.name)
        _check_ranges(cfg.target, "target.")
    if cfg.backbone.weights == "source":
        if cfg.source is None:
            raise UserError("backbone.weights=source needs a source task to pretrain on: add source=NAME "
                            "(e.g. source=digits_0to4) or a source: block.")
        check_source(cfg.source)
    BACKBONES.get(cfg.backbone.name)
    METHODS.check(cfg.method, provided=("model", "teachers"))
    _check_weight_average(cfg)
    if METHODS.get(cfg.method.name).needs_target_data and cfg.target is None:
        raise UserError(f"method={cfg.method.name} adapts to an unlabelled target domain: add target=NAME "
                        "(e.g. target=usps) or use an experiment such as experiment=mnist_usps.")
    entry = optimizer_entry(cfg.optimizer)
    if isinstance(entry.get("lr"), str) and entry["lr"] != AUTO_LR:
        raise bad_value("optimizer.lr", entry["lr"], f"a float > 0, or {AUTO_LR} (a learning-rate range test)")
    if entry.get("lr") == AUTO_LR:  # the range test finds a positive rate: check every other key
        entry["lr"] = 1e-3
    OPTIMIZERS.check(entry, provided=("params",))
    SCHEDULERS.check(cfg.scheduler, provided=("optimizer", "total_steps", "steps_per_epoch"))


def check_source(source: DictConfig) -> None:
    """The source task of backbone.weights=source (train) or of a weights=source candidate (rank)."""
    DATASETS.get(source.dataset.name)
    _check_ranges(source, "source.")
    if source.epochs < 1:
        raise bad_value("source.epochs", source.epochs, "an integer >= 1")
    OPTIMIZERS.check(optimizer_entry(source.optimizer), provided=("params",))
    SCHEDULERS.check(source.scheduler, provided=("optimizer", "total_steps", "steps_per_epoch"))


def _check_weight_average(cfg: DictConfig) -> None:
    ema, swa = cfg.trainer.ema_decay, cfg.trainer.swa_start
    if ema is not None and swa is not None:
        raise UserError(f"trainer.ema_decay={ema} and trainer.swa_start={swa} are both set: choose one way of "
                        "averaging the weights (set the other to null).")
    if swa is not None and not cfg.trainer.steps and swa > cfg.trainer.epochs:
        raise bad_value("trainer.swa_start", swa, f"an epoch in 1..trainer.epochs={cfg.trainer.epochs}: a later "
                        "start averages nothing")
