"""The one way a command that scores checkpoints (eval, export, analyze, fusion) opens them and their data,
and the way a distillation run opens its teachers.

Every guard sits here, so no command can skip one: the weights are finite and the sidecar is the one written
with them (models/checkpoint.py); the dataset's keys are in range; a split carved from a pool is carved as in
training; the scored split holds exactly the samples the checkpoint recorded as held out (a changed folder
or re-ordered table would otherwise re-split and score training samples); the classes match by name.
Data the checkpoint never recorded (another dataset, another root) is scored as new data, and said so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf, ValidationError
from torch.utils.data import Dataset

from transfer_cli.config import DatasetConfig
from transfer_cli.data.batches import Batches
from transfer_cli.data.identity import sample_positions, split_identities
from transfer_cli.data.splits import DataSplits
from transfer_cli.errors import UserError, choices
from transfer_cli.methods.distill import Teacher
from transfer_cli.models.backbone import Classifier
from transfer_cli.models.checkpoint import load_model, read_sidecar, sidecar_path
from transfer_cli.models.ensemble import check_same_classes
from transfer_cli.models.recipe import ModelRecipe
from transfer_cli.pipeline import build_data, make_loader, prepare_splits
from transfer_cli.validation import check_dataset

HELD_OUT = "held_out"  # sidecar key: the digest of each split's samples in the training run


@dataclass
class Member:
    """One opened checkpoint."""

    path: str
    model: Classifier
    meta: dict[str, Any]

    @property
    def recipe(self) -> ModelRecipe:
        return self.model.recipe

    def trained(self, *keys: str) -> dict[str, Any]:
        """A group of the training run's config as the sidecar records it (``trained("target", "dataset")``)."""
        return recorded_config(self.meta, *keys)

    @property
    def trained_on(self) -> dict[str, Any]:
        """The training run's dataset config ({} when the sidecar records none)."""
        return self.trained("dataset")


@dataclass
class Opened:
    """Checkpoints and the data they are scored on, every guard passed."""

    members: list[Member]
    data: DatasetConfig
    splits: DataSplits
    order: list[int] | None  # model output index of each dataset class, when the dataset orders them otherwise
    new_data: bool  # no member recorded these samples: scored as data the models never saw
    prepared: dict[str, DataSplits] = field(default_factory=dict, repr=False)  # per preprocessing, made once

    def loader(self, member: Member, split: str, device: torch.device, batch_size: int | None,
               log: Callable[[str], None]) -> Batches:
        """Unaugmented batches of ``split`` as ``member`` reads them (its own preprocessing)."""
        spec = member.model.spec
        key = json.dumps(spec.to_dict(), sort_keys=True, default=str)
        if key not in self.prepared:
            self.prepared[key] = prepare_splits(self.splits, spec, self.data, log)
        return make_loader(self.prepared[key].split(split), spec, self.data, False, device, batch_size=batch_size)


def open_checkpoints(paths: list[str], scored: set[str], dataset: Any = None,
                     changes: Mapping[str, Any] | None = None, log: Callable[[str], None] = print) -> Opened:
    """Load the checkpoints at ``paths`` and the data to score their ``scored`` splits on: ``dataset`` (a
    dataset= config) when given, else the first checkpoint's own, with ``changes`` (dataset.KEY=VALUE)."""
    members = [Member(path, *load_model(path)) for path in paths]
    check_same_classes(members)
    data = dataset_to_score(dataset, members[0], changes)
    check_dataset(data)
    own = [m for m in members if _same_source(data, m.trained_on)]
    for member in own:
        check_held_out(data, member, scored)
    splits = build_data(data)
    for split in sorted(scored):
        if len(splits.split(split)) == 0:
            raise UserError(f"split={split}: dataset={data.name} has no {split} samples here (dataset.val_fraction="
                            f"{data.val_fraction}). Allowed: a split with samples (test, train), or dataset.val_fraction "
                            "> 0 (e.g. 0.1) for a validation split.")
    order = class_order(members[0].recipe.classes, splits.classes, data.name, paths[0])
    if own:
        held = split_identities(splits, labels=False)
        for member in own:
            _check_same_samples(member.path, member.meta, held, scored, data)
    else:
        log(f"dataset={data.name} is not the data the checkpoint was trained and tested on: it is scored as new data.")
    if order is not None:
        log("the dataset lists the model's classes in another order: predictions are matched by name.")
    return Opened(members, data, splits, order, new_data=not own)


def open_teachers(paths: list[str], data: DatasetConfig, splits: DataSplits, text: bool) -> list[Teacher]:
    """Distillation teachers for a student trained on ``data`` (``splits``), through the same guards as a
    scored checkpoint: a readable, finite checkpoint with its own sidecar, the student's classes by name,
    the student's kind of input, and, for a teacher trained on this very dataset, the student's val and test
    samples held out from its training (else the student would learn their labels from it)."""
    teachers = []
    for path in paths:
        try:
            member = Member(path, *load_model(path))
            if (member.recipe.text is not None) != text:
                raise UserError(f"it is a {'text' if member.recipe.text else 'image'} model but dataset={data.name} "
                                f"holds {'text' if text else 'images'}, and a teacher reads the student's batches.")
            order = class_order(member.recipe.classes, list(splits.classes), data.name, path)
            if _same_source(data, member.trained_on):
                check_held_out(data, member, {"val", "test"})
                _check_same_samples(member.path, member.meta, split_identities(splits, labels=False), {"val", "test"},
                                    data)
        except UserError as err:
            raise UserError(f"method.teacher={path!r} cannot teach this run: {err} A teacher is a checkpoint of "
                            "this tool that predicts the student's classes and never trained on its val/test "
                            "samples.") from None
        teachers.append(Teacher(path, member.model, order))
    return teachers


def recorded_config(meta: dict[str, Any], *keys: str) -> dict[str, Any]:
    """A group of the training run's config as a checkpoint's sidecar ``meta`` records it; {} where it records
    none: the one reader of that untyped record."""
    group: Any = meta.get("config")
    for key in keys:
        group = group.get(key) if isinstance(group, dict) else None
    return group if isinstance(group, dict) else {}


def check_weights_unseen(weights: str, data: DatasetConfig, splits: DataSplits, scored: tuple[str, ...],
                         use: str) -> None:
    """Starting weights (``use``: backbone.weights=, a rank candidate) that are a checkpoint of this tool trained
    on ``data`` must not have trained on the ``scored`` splits' samples: its features would have learned their
    labels, and every number measured on them would be inflated. Any other file passes."""
    path = Path(weights).expanduser()
    if path.suffix != ".safetensors" or not sidecar_path(path).is_file():
        return
    meta = read_sidecar(weights)
    trained = recorded_config(meta, "dataset")
    if trained and _same_source(data, trained):
        theirs = build_data(stored_dataset(trained))  # carved from today's files: the check needs them unchanged
        if HELD_OUT in meta:  # a training run's checkpoint (a cached source model records no held-out split)
            _check_same_samples(weights, meta, split_identities(theirs, labels=False), {"val", "test"}, data)
        check_unseen(theirs.train, data.name, splits, scored, f"{use}={weights!r}", "dataset", trained)


def check_unseen(seen: Dataset, name: str, splits: DataSplits, scored: tuple[str, ...], what: str, group: str,
                 settings: Mapping[str, Any]) -> None:
    """Refuse when ``seen`` (the samples a model was trained on: ``what``, read with ``settings``, the keys of
    config ``group``) shares samples with the ``scored`` splits of ``splits`` (dataset ``name``)."""
    digest, trained_positions = sample_positions(seen)
    overlaps = []
    for split in scored:
        other, positions = sample_positions(splits.split(split))
        overlap = int(np.isin(positions, trained_positions).sum()) if other == digest else 0
        if overlap:
            overlaps.append(f"{overlap} of the {len(positions)} {split}")
    if overlaps:
        how = ", ".join(f"{group}.{k}={json.dumps(settings.get(k))}" for k in ("classes", "shots", "split_seed", "fraction"))
        raise UserError(
            f"{what} was trained on {' and '.join(overlaps)} samples of dataset={name} scored here (read with {how}): "
            "its features have learned their labels, so the numbers would be inflated. Use weights that never "
            "trained on them, or score on data they did not train on (other classes, another dataset).")


def dataset_to_score(override: Any, member: Member, changes: Mapping[str, Any] | None = None) -> DatasetConfig:
    """``override`` (a dataset= config) when given, else the dataset ``member`` was trained on, as its sidecar
    records it, with ``changes`` (``dataset.KEY=VALUE`` without dataset=NAME, e.g. a new dataset.root) over it."""
    if override is not None:
        return OmegaConf.to_object(override)
    if not member.trained_on:
        raise UserError(f"checkpoint={member.path!r}: its sidecar does not record the dataset it was trained on; "
                        "pass dataset=NAME (and dataset.root=...) to say what to evaluate on.")
    merged = OmegaConf.merge(OmegaConf.structured(DatasetConfig), member.trained_on)
    fields = list(merged.keys())
    for key, value in (changes or {}).items():
        if key not in fields:
            raise UserError(f"dataset.{key}: there is no option {key!r}. Keys under dataset: {choices(fields)}.")
        try:
            merged[key] = value
        except ValidationError as err:
            raise UserError(f"dataset.{key}={value!r} does not fit the key's type ({err.msg}).") from None
    return OmegaConf.to_object(merged)


def _same_source(data: DatasetConfig, trained: dict[str, Any]) -> bool:
    """Whether ``data`` reads the dataset the training run read (same registry entry, same files)."""
    if trained.get("name") != data.name:
        return False
    roots = [str(Path(r).expanduser().resolve()) if r else "" for r in (trained.get("root"), data.root)]
    return roots[0] == roots[1]


def check_held_out(data: DatasetConfig, member: Member, scored: set[str]) -> None:
    """Splits carved from one pool (a dataset without an official split) hold only samples the model never
    trained on when carved as in its training run: another split_seed or fraction would mix training
    samples in and inflate the score, so that is refused before any data is read."""
    trained = member.trained_on
    if scored <= {"train"}:
        return
    for key in ("split_seed", "test_fraction", *(("val_fraction",) if "val" in scored else ())):
        if key in trained and trained[key] != getattr(data, key):
            raise UserError(f"dataset.{key}={getattr(data, key)} differs from the {trained[key]} that checkpoint "
                            f"{member.path} was trained with: the {'/'.join(sorted(scored - {'train'}))} split carved "
                            "with it would hold samples the model trained on, and its score would be inflated. "
                            f"Allowed: dataset.{key}={trained[key]} (as in training), or data the model never saw.")


def _check_same_samples(path: str, meta: dict[str, Any], held: dict[str, str], scored: set[str],
                        data: DatasetConfig) -> None:
    recorded = meta.get(HELD_OUT)
    if not isinstance(recorded, dict):
        raise UserError(f"checkpoint={path!r} does not record which samples it held out from training, so "
                        f"scoring it on dataset={data.name} could score training samples. Train it again with this "
                        "version, or pass another dataset (dataset=NAME dataset.root=DIR) to score new data.")
    for split in sorted(scored - {"train"}):
        if recorded.get(split) != held[split]:
            raise UserError(f"dataset={data.name} (dataset.root={data.root!r}) changed since checkpoint={path!r} "
                            f"was trained: its {split} split now holds other samples than the ones held out then "
                            "(files added, removed or edited, or rows re-ordered), so it would be re-split and could "
                            "hold samples the model trained on. Restore the data, or score data the model never saw "
                            "under another root (dataset.root=DIR).")


def class_order(model_classes: list[str], data_classes: list[str], dataset: str, path: str) -> list[int] | None:
    """None when the dataset labels classes exactly as the model does; the model-output index of each
    dataset class when the names are the same set in another order; otherwise a UserError: scoring a model
    on classes it was not trained for gives a number that means nothing."""
    if model_classes == data_classes:
        return None
    if sorted(model_classes) == sorted(data_classes):
        return [model_classes.index(name) for name in data_classes]
    raise UserError(
        f"dataset={dataset} has the classes {', '.join(data_classes[:10])}{' ...' if len(data_classes) > 10 else ''} "
        f"but checkpoint={path!r} predicts {', '.join(model_classes[:10])}{' ...' if len(model_classes) > 10 else ''}. "
        "Evaluate on data with the same class names (e.g. the dataset.classes the model was trained with)."
    )


def stored_dataset(stored: dict[str, Any]) -> DatasetConfig:
    """A dataset config recorded in a sidecar, checked like a training config's."""
    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DatasetConfig), stored))
    check_dataset(data)
    return data
