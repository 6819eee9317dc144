"""`transfer train`: config -> data -> model -> method -> optimizer -> loop -> tables, checkpoints, plots."""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from transfer_cli import resume
from transfer_cli.data.identity import data_identity, split_identities
from transfer_cli.engine import distributed, train_state
from transfer_cli.engine.averaging import WeightAverage
from transfer_cli.engine.device import (
    Precision,
    configure_threads,
    deterministic_algorithms,
    resolve_device,
    seed_stage,
)
from transfer_cli.engine.distributed import SINGLE
from transfer_cli.engine.hooks import Checkpointer, EvalHook, training_weights
from transfer_cli.engine.loop import Diverged, State, evaluate, fit
from transfer_cli.engine.validators import VALIDATORS, TargetValidators, validator_picks
from transfer_cli.errors import UserError
from transfer_cli.files import atomic_write_text, discard_if_only_hydra, remove_orphan_tmp
from transfer_cli.methods.base import METHODS, DataContext, Method
from transfer_cli.models.checkpoint import save_model
from transfer_cli.pipeline import (
    build_any_model,
    build_data,
    build_optimization,
    make_loader,
    prepare_splits,
    sample_loader,
)
from transfer_cli.reporting.alignment import analyze_alignment
from transfer_cli.reporting.plots import plot_curves
from transfer_cli.reporting.progress import ProgressHook, plain_log
from transfer_cli.reporting.summary import command_line, summary_frame, versions, write_summary
from transfer_cli.reporting.tables import MetricsWriter, metrics_frame, rich_record, write_table
from transfer_cli.run_files import RunFiles
from transfer_cli.scoring import HELD_OUT
from transfer_cli.source import source_model


def run_train(cfg: DictConfig, run_dir: Path, console: Console | None = None, sweep_job: bool = False) -> dict[str, Any]:
    """Train one run into ``run_dir``. ``sweep_job``: the folder belongs to a sweep job, so a finished
    run there is reused as it is and an unfinished one resumes (this is how sweeps resume)."""
    console = console or Console()
    started = time.perf_counter()
    dist, device = distributed.init(resolve_device(cfg.trainer.device))
    if dist.active and not METHODS.get(cfg.method.name).trains_body:
        # Cached features and a head fitted on them need no data parallelism: process 0 runs it alone.
        if not dist.main:
            return {"status": "left to process 0", "best": None}
        console.print(f"method={cfg.method.name} trains a head on cached features: process 0 runs it alone.")
        dist = SINGLE
    if not dist.main:  # the others train and evaluate but write and print nothing
        console = Console(file=io.StringIO())
    resolved = OmegaConf.to_container(cfg, resolve=True)  # once: every checkpoint sidecar embeds it
    own_dir, payload, finished = run_dir, None, None
    if dist.main:  # process 0 decides where the run lives and whether it resumes; the others follow
        job_state = resume.status(run_dir) if sweep_job else None
        if job_state in ("finished", "resumable"):
            resume.check_same_config(run_dir, resolved)
            if job_state == "finished" and _same_data(run_dir, cfg):
                console.print(f"{run_dir} already finished with this config: kept as it is.")
                finished = RunFiles(run_dir).read_summary()
            elif job_state == "resumable":
                payload = train_state.load(run_dir / "checkpoints")
        elif not sweep_job and (found := resume.choose(str(cfg.trainer.resume), run_dir, resolved)) is not None:
            run_dir, payload = found, train_state.load(found / "checkpoints")
        elif not sweep_job and cfg.trainer.resume == "auto":
            console.print("trainer.resume=auto: no unfinished run with this config; starting a new one.")
        if not sweep_job and payload is None:
            resume.check_fresh(run_dir, cfg.trainer.overwrite)
        if payload is None and finished is None:  # a fresh start: what an earlier attempt here left is stale
            files = RunFiles(run_dir)
            for stale in (files.summary, files.error, files.train_state):
                stale.unlink(missing_ok=True)
        removed = remove_orphan_tmp(run_dir)
        if removed:
            console.print(f"removed {len(removed)} temporary file(s) a killed write left behind.")
    run_dir, resuming, finished = dist.broadcast((run_dir, payload is not None, finished))
    if finished is not None:
        return finished
    if run_dir != own_dir:  # torchrun started every process with its own Hydra folder: only process 0's is used
        discard_if_only_hydra(own_dir)
    if resuming and payload is None:
        payload = train_state.load(run_dir / "checkpoints")
    if payload is not None:  # the run's wall time includes the time before it was stopped
        started -= float(payload.get("wall_time_s", 0.0))
    deterministic_algorithms(cfg.trainer.deterministic)
    configure_threads(cfg.trainer.threads)
    precision = Precision(str(cfg.trainer.precision), device)
    if dist.main:
        atomic_write_text(RunFiles(run_dir).config, OmegaConf.to_yaml(resolved))

    with dist.main_first():  # caches (a source model, checked image files) are built once, by process 0
        source = source_model(cfg, device, precision, console) if _uses_source(cfg, console) else None
        splits = build_data(cfg.dataset)
    if len(splits.test) == 0:
        raise UserError(f"dataset={cfg.dataset.name} has no test samples (dataset.root={cfg.dataset.root!r}), so "
                        "the run could report nothing: add a test/ (or val/) folder, or use a dataset with a test split.")
    target = build_data(cfg.target.dataset) if cfg.target else None
    if target and len(target.classes) != len(splits.classes):  # names may differ ("0 - zero" vs "0")
        raise UserError(f"target.dataset={cfg.target.dataset.name} has {len(target.classes)} classes but "
                        f"dataset={cfg.dataset.name} has {len(splits.classes)}: domains must share their classes.")
    seed_stage(cfg.seed, "init")  # every random stream from here on depends on the seed and its stage only
    model = build_any_model(cfg, splits, source.body if source else None,
                            weights="none" if cfg.backbone.weights == "source" and not source else None)
    for note in [*splits.notes, *model.notes]:
        console.print(note, highlight=False, soft_wrap=True)

    log = plain_log(console)

    with dist.main_first():  # decoded images and token ids are cached by process 0, then read by the others
        splits = prepare_splits(splits, model.spec, cfg.dataset, log)
        target = prepare_splits(target, model.spec, cfg.target.dataset, log) if target else None
    seed_stage(cfg.seed, "method")
    method = METHODS.build(cfg.method, model=model).to(device)
    if method.trains_body and not any(True for _ in model.body.parameters()):
        raise UserError(f"method={cfg.method.name} trains the backbone, but backbone={cfg.backbone.name} has no "
                        "trainable weights (a fitted TF-IDF vectoriser). Use method=linear_probe: a logistic "
                        "regression on its features.")
    if cfg.trainer.channels_last:
        method.to(memory_format=torch.channels_last)

    def make(split: str, train: bool, sharded: bool = True) -> DataLoader:
        return make_loader(splits.split(split), model.spec, cfg.dataset, train, device, cfg.seed,
                           dist=dist if sharded else SINGLE)

    def make_target(split: str, train: bool) -> DataLoader:
        return make_loader(target.split(split), model.spec, cfg.target.dataset, train, device, cfg.seed + 1, dist=dist)

    data = data_identity(splits)
    if payload is not None and payload["data"] != data:
        raise UserError(f"cannot resume {run_dir}: the data of dataset={cfg.dataset.name} changed since the run "
                        "started (files added, removed or modified). Start a new run.")
    identity = {split: {"input": model.spec.to_dict(), "samples": digest}
                for split, digest in split_identities(splits).items()}
    context = DataContext(device, precision, identity, make_target if target else None)
    seed_stage(cfg.seed, "features")
    with dist.main_first():  # cached features (LP-FT's probe) are computed once, by process 0
        loaders = method.loaders(make, context)
    steps_per_epoch = len(loaders["train"])
    epochs = cfg.trainer.epochs
    if cfg.trainer.steps:
        epochs = max(1, math.ceil(cfg.trainer.steps * cfg.trainer.accumulate / steps_per_epoch))
    optimizer, scheduler = build_optimization(method, cfg.optimizer, cfg.scheduler, steps_per_epoch, epochs,
                                              cfg.trainer.accumulate, dist.world)
    if cfg.trainer.compile:
        method.model.compile()

    about = method.describe()
    unit = "rows" if splits.text else "files"
    console.print(
        f"[bold]{cfg.dataset.name}[/] ({len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, "
        f"{len(splits.classes)} classes{f', {splits.skipped} unusable {unit} skipped' if splits.skipped else ''}) "
        f"-> [bold]{cfg.backbone.name}[/] weights={cfg.backbone.weights} {model.spec.describe()} "
        f"-> [bold]{cfg.method.name}[/]: {about['params_trainable']:,}/{about['params_total']:,} "
        f"parameters trainable, on {device} ({precision.name})",
        highlight=False,
        soft_wrap=True,
    )

    held_out = split_identities(splits, labels=False)  # eval/export refuse a test split other than this one

    def describe_epoch(state: State) -> dict[str, Any]:
        return {"epoch": state.epoch + 1, "metrics": state.epoch_metrics, "config": resolved, HELD_OUT: held_out}

    def save(path: Path, weights: dict[str, torch.Tensor], facts: dict[str, Any]) -> None:
        if dist.main:
            save_model(path, weights, model.recipe, **facts)

    averaging = _weight_average(cfg, method, make, device, precision, epochs)
    weights = averaging.applied if averaging else training_weights

    has_val = len(splits.val) > 0
    if not has_val:
        console.print("no validation split (dataset.val_fraction=0): the last epoch's weights are kept and tested.")
    checkpoints = run_dir / "checkpoints"

    def save_train_state(state: State) -> None:
        payload = train_state.capture(state, loaders["train"], precision.scaler, data, averaging)
        payload["rng_per_process"] = dist.gather(payload["rng"])  # each process's dropout / augmentation draws
        payload["wall_time_s"] = time.perf_counter() - started
        if dist.main:
            train_state.save(checkpoints, payload)

    split, metric, higher = VALIDATORS.get(cfg.trainer.select, ("last", "epoch", True))
    checkpointer = Checkpointer(checkpoints, save, describe_epoch, split, metric, cfg.trainer.save_every_s,
                                save_train_state, weights, higher, method.selectable_from, dist.broadcast)
    state = State(method, optimizer, scheduler, epochs, steps_per_epoch)
    if payload is not None:
        train_state.restore(state, payload, loaders["train"], precision.scaler, averaging, dist.rank, dist.world)
        if state.best:  # none yet when the run was killed before its first selectable epoch (SHOT's source phase)
            checkpointer.best_state = load_file(str(checkpoints / "best.safetensors"))
        console.print(f"resuming {run_dir} at epoch {state.epoch + 1}/{epochs} (optimizer step {state.step})",
                      highlight=False)
    elif source:  # the source model's own learning curve opens the run's table
        state.history.extend(source.history)
    hooks = [
        *([averaging] if averaging else []),  # first: the average includes this epoch before it is evaluated
        *([EvalHook(loaders["val"], device, precision, "val", weights)] if has_val else []),
        # Target labels are only ever used here, to measure; checkpoints are chosen on source val or on the
        # label-free validators (trainer.select).
        *([EvalHook(make_target("test", False), device, precision, "target_test", weights),
           TargetValidators(make_target("train", False), device, precision, weights)] if target else []),
        *([MetricsWriter(RunFiles(run_dir).metrics)] if dist.main else []),
        *method.hooks(),  # before the checkpointer: the saved state includes what they change (unfrozen stages)
        checkpointer,
        *([ProgressHook(console, cfg.trainer.progress, cfg.trainer.log_every)] if dist.main else []),
    ]
    if payload is None:  # a resumed run continues the random streams its training state recorded
        seed_stage(cfg.seed, "train")  # dropout, augmentation and every other draw of the loop
    try:
        fit(state, loaders["train"], device, precision, hooks, cfg.trainer.accumulate, cfg.trainer.grad_clip)
    except Diverged as err:
        if dist.main:
            _write_diverged(run_dir, cfg, state, err, time.perf_counter() - started)
        raise

    # Report the test split once, with the weights that were best on validation.
    method.load_plain_state(checkpointer.best_state)
    test = evaluate(method, loaders["test"], device, precision)
    state.history.append({"epoch": state.best["epoch"], "split": "test", **test})
    metrics = metrics_frame(state.history)
    picks = validator_picks(state.history, method.selectable_from + 1) if target else []
    if dist.main:
        write_table(metrics, RunFiles(run_dir).metrics, markdown=True)
        if picks:  # what each label-free validator would have kept, next to the oracle
            write_table(pd.DataFrame(picks), run_dir / "validators.csv", markdown=True)
        if cfg.trainer.plots:
            plot_curves(metrics, run_dir / "curves.png")
    if cfg.trainer.analyze and dist.main:  # the kept weights' features on 1,000 test images of each domain
        analyze_alignment(
            method.model,
            (cfg.dataset.name, sample_loader(splits.test, model.spec, cfg.dataset, device, 1000, cfg.seed)),
            (cfg.target.dataset.name, sample_loader(target.test, model.spec, cfg.target.dataset, device, 1000, cfg.seed)),
            list(splits.classes), device, precision, run_dir, cfg.seed)

    summary = {
        "name": cfg.name,
        "status": "ok",
        "run_dir": str(run_dir),
        "command": command_line(),
        "dataset": cfg.dataset.name,
        "backbone": cfg.backbone.name,
        "weights": str(source.path) if source else cfg.backbone.weights,
        "method": cfg.method.name,
        "seed": cfg.seed,
        "classes": len(splits.classes),
        "input": model.spec.brief(),  # the preprocessing used: size, resize, mean, std / the tokenizer
        "samples": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "skipped_files": splits.skipped,
        "data_identity": data,
        "data_notes": splits.notes,
        "target": cfg.target.dataset.name if target else None,
        "select": cfg.trainer.select,
        # Every split's metrics at the epoch whose weights were kept (the target test of the checkpoint).
        "at_best": {r["split"]: _metrics(r) for r in state.history if r["epoch"] == state.best["epoch"]
                    and r["split"] != "test"},
        "target_test": state.epoch_metrics.get("target_test"),
        "selection": picks,
        "epochs": state.epoch + 1,
        "best": state.best,
        "test": test,
        "final": dict(state.epoch_metrics),
        **method.describe(),  # after training: gradual unfreezing changes what trains
        **(averaging.describe() if averaging else {}),
        "wall_time_s": time.perf_counter() - started,
        "processes": dist.world,  # dataset.batch_size is per process
        "global_batch": cfg.dataset.batch_size * dist.world * cfg.trainer.accumulate,
        "device": str(device),
        "precision": precision.name,
        "versions": versions(),
    }
    table = summary_frame(summary)
    if dist.main:
        write_summary(run_dir, summary, {"Result": table, "Metrics per epoch": metrics})
    console.print(rich_record(table.iloc[0].to_dict(), title=f"{cfg.name}  ->  {run_dir}"), soft_wrap=True)
    return summary


def _weight_average(cfg: DictConfig, method: Method, make: Callable[..., DataLoader], device: torch.device,
                    precision: Precision, epochs: int) -> WeightAverage | None:
    """The EMA / SWA hook the trainer settings ask for, or None."""
    ema, swa = cfg.trainer.ema_decay, cfg.trainer.swa_start
    if ema is None and swa is None:
        return None
    if swa is not None and swa > epochs:  # trainer.steps decides the epochs only once the data is known
        raise UserError(f"trainer.swa_start={swa} is past the run's last epoch ({epochs}, from trainer.steps="
                        f"{cfg.trainer.steps}): nothing would be averaged. Start SWA at an epoch in 1..{epochs}.")
    if method.manual_optimization:
        raise UserError(f"trainer.ema_decay={ema} / trainer.swa_start={swa} average the weights along a "
                        f"gradient-descent path, but method={cfg.method.name} fits its weights in one solve "
                        "(solver=lbfgs): there is nothing to average. Set them to null, or use solver=sgd.")
    # plain train images, as test time sees them; every process measures the same statistics on all of them
    bn_loader = make("train", False, False) if swa is not None else None
    return WeightAverage(method.model, ema, swa, bn_loader, device, precision, method.frozen_norms)


def _uses_source(cfg: DictConfig, console: Console) -> bool:
    """Whether the run starts from a source-pretrained body: a method that re-initialises every layer is
    not made to pretrain (or read) one it would throw away."""
    if cfg.backbone.weights != "source":
        return False
    if not METHODS.get(cfg.method.name).uses_pretrained_weights:
        console.print(f"method={cfg.method.name} re-initialises every layer: backbone.weights=source is not built.",
                      highlight=False)
        return False
    return True


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("epoch", "split")}


def _same_data(run_dir: Path, cfg: DictConfig) -> bool:
    """Whether a finished run's summary was computed from the data ``cfg`` reads now."""
    recorded = (RunFiles(run_dir).read_summary() or {}).get("data_identity")
    return recorded == data_identity(build_data(cfg.dataset))


def _write_diverged(run_dir: Path, cfg: DictConfig, state: State, err: Diverged, seconds: float) -> None:
    """The summary of a run stopped by a non-finite loss: what happened, where, and the epochs before it."""
    summary = {"name": cfg.name, "status": "diverged", "error": str(err), "run_dir": str(run_dir),
               "command": command_line(), "dataset": cfg.dataset.name, "backbone": cfg.backbone.name,
               "method": cfg.method.name, "epochs": state.epoch, "diverged_at": {"epoch": err.epoch + 1,
               "batch": err.batch + 1, "step": err.step, "last_finite_loss": err.last_finite},
               "best": state.best or None, "wall_time_s": seconds, "versions": versions()}
    if state.history:
        write_table(metrics_frame(state.history), RunFiles(run_dir).metrics, markdown=True)
    atomic_write_text(RunFiles(run_dir).summary, json.dumps(summary, indent=2, default=str) + "\n")
