"""A run's pieces built from its config, in one place: data, model, method, loaders, optimizer, schedule.

`build_run` is the wiring that `transfer train`, the tests and the benchmarks share; everything that needs
the built data to be checked (a test split to report, domains that share classes, a body to train, a
resumed run's data) is checked here. The order of the seeded stages (init, method, features) is the order
in which the pieces are built, so a run's numbers depend on its seed only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from transfer_cli.data.batches import Batches
from transfer_cli.data.identity import data_identity, input_identities, split_identities
from transfer_cli.data.splits import DataSplits
from transfer_cli.engine.device import Precision, seed_stage
from transfer_cli.engine.distributed import SINGLE, Dist
from transfer_cli.engine.lr_find import LrCurve, lr_range_test
from transfer_cli.errors import UserError
from transfer_cli.methods.base import METHODS, DataContext, Method
from transfer_cli.models.backbone import Classifier
from transfer_cli.optim import AUTO_LR, optimizer_entry
from transfer_cli.pipeline import (
    build_data,
    build_model,
    build_optimization,
    build_optimizer,
    make_loader,
    prepare_splits,
)
from transfer_cli.reporting.progress import plain_log
from transfer_cli.scoring import check_unseen, check_weights_unseen, open_teachers
from transfer_cli.source import SourceModel, source_model


@dataclass
class Run:
    """Everything one training run is made of, built and checked."""

    cfg: DictConfig
    device: torch.device
    precision: Precision
    dist: Dist
    source: SourceModel | None  # the source-pretrained body the model started from
    splits: DataSplits  # as the model reads them (token ids, decoded images)
    target: DataSplits | None  # the unlabelled target domain of a domain-adaptation run
    model: Classifier
    method: Method
    loaders: dict[str, Any]  # train / val / test, as the method wants them
    optimizer: Any
    scheduler: Any
    epochs: int
    steps_per_epoch: int
    data: str  # the data's identity (data/identity.py): a run resumes only on the data it started on
    held_out: dict[str, Any]  # the identity of each split's samples: eval refuses a test split other than this
    lr_found: float | None = None  # optimizer.lr=auto: the rate the range test chose (or the resumed run recorded)
    lr_curve: LrCurve | None = None  # the range test's curve (process 0; None when resumed)
    opened: list[Batches] = field(default_factory=list)  # every loader made below, for `close`

    def loader(self, split: str, train: bool, sharded: bool = True) -> Batches:
        """Batches of one split of the dataset; ``sharded``: each process takes its share."""
        if self.splits.split(split) is None:
            raise LookupError(f"this run's data has no {split} split")
        return self._opened(make_loader(self.splits.split(split), self.model.spec, self.cfg.dataset, train,
                                        self.device, self.cfg.seed, dist=self.dist if sharded else SINGLE,
                                        persistent=True))

    def target_loader(self, split: str, train: bool) -> Batches:
        return self._opened(make_loader(self.target.split(split), self.model.spec, self.cfg.target.dataset, train,
                                        self.device, self.cfg.seed + 1, dist=self.dist, persistent=True))

    def _opened(self, loader: Batches) -> Batches:
        self.opened.append(loader)
        return loader

    def close(self) -> None:
        """End the worker processes of the run's loaders (a sweep's next job should not inherit them)."""
        for loader in self.opened:
            loader.close()


def build_run(cfg: DictConfig, device: torch.device, precision: Precision, dist: Dist = SINGLE,
              console: Console | None = None, resumed: Mapping[str, Any] | None = None) -> Run:
    """The run ``cfg`` describes. ``resumed``: the training state a resumed run continues from (its data must be
    the data it started on; its found learning rate is reused). Caches (a source model, decoded images,
    features) are built by process 0 first."""
    console = console or Console(quiet=True)
    with dist.main_first():
        splits = build_data(cfg.dataset)
        # starting weights (a checkpoint of this tool, a source model) must not have trained on what is scored
        check_weights_unseen(cfg.backbone.weights, OmegaConf.to_object(cfg.dataset), splits, ("val", "test"),
                             "backbone.weights")
        source_splits = build_data(cfg.source.dataset) if uses_source(cfg, console) else None
        if source_splits is not None:
            check_unseen(source_splits.train, cfg.dataset.name, splits, ("val", "test"), "the source model (source."
                         f"dataset={cfg.source.dataset.name})", "source.dataset",
                         OmegaConf.to_container(cfg.source.dataset, resolve=True))
        source = source_model(cfg, source_splits, device, precision, console) if source_splits else None
    target = _target_data(cfg, splits)
    seed_stage(cfg.seed, "init")  # every random stream from here on depends on the seed and its stage only
    model = build_model(cfg, splits, source.body if source else None,
                        weights="none" if cfg.backbone.weights == "source" and not source else None)
    for note in [*splits.notes, *model.notes]:
        console.print(note, highlight=False, soft_wrap=True)
    with dist.main_first():
        splits = prepare_splits(splits, model.spec, cfg.dataset, plain_log(console))
        target = prepare_splits(target, model.spec, cfg.target.dataset, plain_log(console)) if target else None
    seed_stage(cfg.seed, "method")
    method = _build_method(cfg, model, device, splits)
    data = data_identity(splits)
    if resumed is not None and resumed["data"] != data:
        raise UserError(f"cannot resume: the data of dataset={cfg.dataset.name} (dataset.root={cfg.dataset.root!r}) "
                        "changed since the run started (files added, removed or modified). Start a new run.")
    run = Run(cfg, device, precision, dist, source, splits, target, model, method, {}, None, None,
              cfg.trainer.epochs, 0, data, split_identities(splits, labels=False))
    identity = input_identities(splits, model.spec)
    seed_stage(cfg.seed, "features")
    try:
        with dist.main_first():  # cached features (LP-FT's probe) are computed once, by process 0
            run.loaders = method.loaders(run.loader, DataContext(device, precision, identity,
                                                                 run.target_loader if target else None))
        _build_optimization(run, resumed.get("lr_found") if resumed else None)
    except BaseException:
        run.close()
        raise
    return run


def _target_data(cfg: DictConfig, splits: DataSplits) -> DataSplits | None:
    if len(splits.test) == 0:
        raise UserError(f"dataset={cfg.dataset.name} has no test samples (dataset.root={cfg.dataset.root!r}), so "
                        "the run could report nothing: add a test/ (or val/) folder, or use a dataset with a test split.")
    target = build_data(cfg.target.dataset) if cfg.target else None
    if target and len(target.classes) != len(splits.classes):  # names may differ ("0 - zero" vs "0")
        raise UserError(f"target.dataset={cfg.target.dataset.name} has {len(target.classes)} classes but "
                        f"dataset={cfg.dataset.name} has {len(splits.classes)}: domains must share their classes.")
    return target


def _build_method(cfg: DictConfig, model: Classifier, device: torch.device, splits: DataSplits) -> Method:
    # A method with a teacher key (distill) gets its teacher checkpoints opened through the scoring guards.
    teacher = cfg.method.get("teacher")
    provided = {} if teacher is None else {"teachers": open_teachers(
        [teacher] if isinstance(teacher, str) else list(teacher), OmegaConf.to_object(cfg.dataset), splits,
        splits.text)}
    method = METHODS.build(cfg.method, model=model, **provided).to(device)
    if method.trains_body and not any(True for _ in model.body.parameters()):
        raise UserError(f"method={cfg.method.name} trains the backbone, but backbone={cfg.backbone.name} has no "
                        "trainable weights (a fitted TF-IDF vectoriser). Use method=linear_probe: a logistic "
                        "regression on its features.")
    if cfg.trainer.channels_last:
        method.to(memory_format=torch.channels_last)
    return method


def _build_optimization(run: Run, resumed_lr: float | None) -> None:
    """The optimizer and schedule over the run's epochs (``trainer.steps`` sets them from the train loader);
    with ``optimizer.lr=auto``, at the rate the range test finds (or ``resumed_lr``, never searched again)."""
    trainer, optimizer_cfg = run.cfg.trainer, run.cfg.optimizer
    run.steps_per_epoch = len(run.loaders["train"])
    if trainer.steps:
        run.epochs = max(1, math.ceil(trainer.steps * trainer.accumulate / run.steps_per_epoch))
    if optimizer_cfg.get("lr") == AUTO_LR:
        run.lr_found = resumed_lr if resumed_lr is not None else _find_lr(run)
        optimizer_cfg = {**OmegaConf.to_container(optimizer_cfg, resolve=True), "lr": run.lr_found}
    run.optimizer, run.scheduler = build_optimization(run.method, optimizer_cfg, run.cfg.scheduler,
                                                      run.steps_per_epoch, run.epochs, trainer.accumulate,
                                                      run.dist.world)
    if trainer.compile:
        run.method.model.compile()


def _find_lr(run: Run) -> float:
    """Process 0 runs the range test on its share of the train split; every process uses its suggestion."""
    if run.method.manual_optimization:
        raise UserError(f"optimizer.lr=auto: method={run.cfg.method.name} fits its weights in one solve "
                        "(solver=lbfgs), without a learning rate to search. Allowed: a number (optimizer.lr=1e-3), "
                        "or a gradient-descent method (e.g. method.solver=sgd).")
    entry = optimizer_entry(run.cfg.optimizer)

    def make_optimizer(lr: float) -> torch.optim.Optimizer:
        return build_optimizer(run.method, entry, lr)

    if run.dist.main:
        try:
            run.lr_curve = lr_range_test(run.method, make_optimizer, run.loaders["train"], run.device, run.precision,
                                         run.cfg.seed)
        except ValueError as err:  # the loss was non-finite from the first steps on
            raise UserError(f"optimizer.lr=auto: {err} (the loss was not finite at the smallest rates). Give a rate "
                            "(optimizer.lr=1e-4), or check dataset.mean/std and trainer.precision.") from None
    return float(run.dist.broadcast(run.lr_curve.suggestion if run.lr_curve else None))


def uses_source(cfg: DictConfig, console: Console) -> bool:
    """Whether the run starts from a source-pretrained body: a method that re-initialises every layer is
    not made to pretrain (or read) one it would throw away."""
    if cfg.backbone.weights != "source":
        return False
    if not METHODS.get(cfg.method.name).uses_pretrained_weights:
        console.print(f"method={cfg.method.name} re-initialises every layer: backbone.weights=source is not built.",
                      highlight=False)
        return False
    return True

