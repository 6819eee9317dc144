"""`transfer train`: config -> data -> model -> method -> optimizer -> loop -> tables, checkpoints, plots."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from transfer_cli.data.identity import data_identity
from transfer_cli.engine import distributed, train_state
from transfer_cli.engine.averaging import WeightAverage
from transfer_cli.engine.device import (
    Precision,
    configure_threads,
    deterministic_algorithms,
    resolve_device,
    seed_stage,
)
from transfer_cli.engine.distributed import SINGLE, Dist
from transfer_cli.engine.hooks import Checkpointer, EvalHook, training_weights
from transfer_cli.engine.loop import Diverged, Hook, State, evaluate, fit
from transfer_cli.engine.lr_find import LrCurve
from transfer_cli.engine.selection import selection
from transfer_cli.engine.validators import TargetValidators, validator_picks
from transfer_cli.errors import UserError
from transfer_cli.files import atomic_write_text, discard_if_only_hydra
from transfer_cli.methods.base import METHODS
from transfer_cli.models.checkpoint import save_model
from transfer_cli.pipeline import build_data, sample_loader
from transfer_cli.reporting.alignment import analyze_alignment
from transfer_cli.reporting.epoch_hooks import MetricsWriter, TrackingHook
from transfer_cli.reporting.plots import plot_curves, plot_lr_find
from transfer_cli.reporting.progress import ProgressHook
from transfer_cli.reporting.summary import command_line, summary_frame, versions, write_summary_md
from transfer_cli.reporting.tables import metrics_frame, rich_record, write_table
from transfer_cli.reporting.tracking import RunRecord, Trackers
from transfer_cli.reporting.tracking.background import open_trackers
from transfer_cli.reporting.tracking.record import epoch_metrics
from transfer_cli.run import Run, build_run
from transfer_cli.run_folder import RunFolder, RunStatus, RunSummary, choose_resume
from transfer_cli.scoring import HELD_OUT


def run_train(cfg: DictConfig, run_dir: Path, console: Console | None = None, sweep_job: bool = False,
              trackers: Trackers | None = None) -> dict[str, Any]:
    """Train one run into ``run_dir``. ``sweep_job``: the folder belongs to a sweep job, so a finished
    run there is reused as it is and an unfinished one resumes (this is how sweeps resume). ``trackers``:
    the run's trackers when the command opened them already (`open_trackers`, before torch is imported, so
    that their start-up overlaps it); chosen here when None."""
    console = console or Console()
    started = time.perf_counter()
    dist, device = distributed.init(resolve_device(cfg.trainer.device))
    dist = _processes(cfg, dist, console)
    if dist is None:
        return {"status": "left to process 0", "best": None}
    if not dist.main:  # the others train and evaluate but write and print nothing
        console = Console(file=io.StringIO())
    resolved = OmegaConf.to_container(cfg, resolve=True)  # once: every checkpoint sidecar embeds it
    try:
        folder, payload, finished = _start(cfg, run_dir, resolved, sweep_job, dist, console)
    except BaseException:
        if trackers is not None:
            trackers.discard()
        raise
    if finished is not None:
        if trackers is not None:
            trackers.discard()
        return finished
    if payload is not None:  # the run's wall time includes the time before it was stopped
        started -= float(payload.get("wall_time_s", 0.0))
    try:
        if trackers is None:
            trackers = open_trackers(resolved.get("tracker") or {}, cfg.output_dir) if dist.main else Trackers([])
        trackers.start(RunRecord.of_run(folder.path, resolved, sweep_job), payload["next_epoch"] if payload else 0)
    except UserError:
        discard_if_only_hydra(folder.path)  # nothing ran: leave no run folder behind
        raise
    with trackers.failures_marked(folder):
        return _train(cfg, folder, payload, resolved, device, dist, trackers, started, console)


def _train(cfg: DictConfig, folder: RunFolder, payload: dict[str, Any] | None, resolved: dict[str, Any],
           device: torch.device, dist: Dist, trackers: Trackers, started: float, console: Console) -> dict[str, Any]:
    """Build the run, fit it and finish it; the run's loader workers end with it."""
    deterministic_algorithms(cfg.trainer.deterministic)
    configure_threads(cfg.trainer.threads)
    precision = Precision(str(cfg.trainer.precision), device)
    if dist.main:
        atomic_write_text(folder.config, OmegaConf.to_yaml(resolved))

    run = build_run(cfg, device, precision, dist, console, resumed=payload)
    try:
        return _fit(run, folder, payload, resolved, trackers, started, console)
    finally:
        run.close()


def _fit(run: Run, folder: RunFolder, payload: dict[str, Any] | None, resolved: dict[str, Any], trackers: Trackers,
         started: float, console: Console) -> dict[str, Any]:
    """Train the built run (from the resumed state when there is one), then evaluate and write it."""
    cfg, device, dist, precision = run.cfg, run.device, run.dist, run.precision
    if run.lr_curve and dist.main:
        write_lr_curve(run.lr_curve, folder)
    _describe(run, console)
    averaging = _weight_average(run)
    state = State(run.method, run.optimizer, run.scheduler, run.epochs, run.steps_per_epoch)
    hooks: list[Hook] = []  # filled below; every write of a checkpoint saves their state with it
    checkpointer = _checkpointer(run, folder, resolved, averaging, started, hooks)
    hooks += _hooks(run, folder, averaging, checkpointer, trackers, console)
    if payload is not None:
        train_state.restore(state, payload, run.loaders["train"], precision.scaler, hooks, dist.rank, dist.world)
        console.print(f"resuming {folder.path} at epoch {state.epoch + 1}/{run.epochs} (optimizer step {state.step})",
                      highlight=False)
    else:
        state.history.extend(run.source.history if run.source else [])  # the source's curve opens the table
        seed_stage(cfg.seed, "train")  # dropout, augmentation and every other draw of the loop
    try:
        fit(state, run.loaders["train"], device, precision, hooks, cfg.trainer.accumulate, cfg.trainer.grad_clip)
    except Diverged as err:
        if dist.main:
            _write_diverged(folder, cfg, state, err, time.perf_counter() - started)
        raise
    return _finish(run, state, checkpointer, folder, averaging, trackers, started, console)


def _processes(cfg: DictConfig, dist: Dist, console: Console) -> Dist | None:
    """The processes that run this method: all of them, or process 0 alone (None for the others) where
    data parallelism has nothing to split (a head fitted on cached features)."""
    if not dist.active or METHODS.get(cfg.method.name).trains_body:
        return dist
    if not dist.main:
        return None
    console.print(f"method={cfg.method.name} trains a head on cached features: process 0 runs it alone.")
    return SINGLE


def _start(cfg: DictConfig, run_dir: Path, resolved: dict[str, Any], sweep_job: bool, dist: Dist,
           console: Console) -> tuple[RunFolder, dict[str, Any] | None, dict[str, Any] | None]:
    """Where the run lives, the training state it resumes from (or None) and, for a sweep job that already
    finished with this config and data, its summary. Process 0 decides; the others follow."""
    folder, payload, finished = RunFolder(run_dir), None, None
    if dist.main:
        folder, payload, finished = _choose_start(cfg, folder, resolved, sweep_job, console)
    path, resuming, finished = dist.broadcast((folder.path, payload is not None, finished))
    if path != run_dir:  # torchrun started every process with its own Hydra folder: only process 0's is used
        discard_if_only_hydra(run_dir)
    folder = RunFolder(path)
    if resuming and payload is None:
        payload = train_state.load(folder.train_state)
    return folder, payload, finished


def _choose_start(cfg: DictConfig, folder: RunFolder, resolved: dict[str, Any], sweep_job: bool,
                  console: Console) -> tuple[RunFolder, dict[str, Any] | None, dict[str, Any] | None]:
    payload, finished = None, None
    status = folder.status() if sweep_job else None
    if status in (RunStatus.FINISHED, RunStatus.RESUMABLE):
        folder.check_same_config(resolved)
        if status is RunStatus.FINISHED and _same_data(folder, cfg):
            console.print(f"{folder.path} already finished with this config: kept as it is.")
            finished = folder.read_summary().to_json()
        elif status is RunStatus.RESUMABLE:
            payload = train_state.load(folder.train_state)
    elif not sweep_job and (found := choose_resume(str(cfg.trainer.resume), folder.path, resolved)) is not None:
        folder, payload = found, train_state.load(found.train_state)
    elif not sweep_job and cfg.trainer.resume == "auto":
        console.print("trainer.resume=auto: no unfinished run with this config; starting a new one.")
    if not sweep_job and payload is None:
        folder.check_fresh(cfg.trainer.overwrite)
    if payload is None and finished is None:  # a fresh start: what an earlier attempt here left is stale
        folder.clear_stale()
    removed = folder.remove_orphan_tmp()
    if removed:
        console.print(f"removed {len(removed)} temporary file(s) a killed write left behind.")
    return folder, payload, finished


def _describe(run: Run, console: Console) -> None:
    cfg, splits, about = run.cfg, run.splits, run.method.describe()
    unit = "rows" if splits.text else "files"
    console.print(
        f"[bold]{cfg.dataset.name}[/] ({len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, "
        f"{len(splits.classes)} classes{f', {splits.skipped} unusable {unit} skipped' if splits.skipped else ''}) "
        f"-> [bold]{cfg.backbone.name}[/] weights={cfg.backbone.weights}"
        f"{f' cut={cfg.backbone.cut}' if cfg.backbone.cut else ''} {run.model.spec.describe()} "
        f"-> [bold]{cfg.method.name}[/]: {about['params_trainable']:,}/{about['params_total']:,} "
        f"parameters trainable, on {run.device} ({run.precision.name})",
        highlight=False,
        soft_wrap=True,
    )
    if run.lr_found is not None:
        # the test's cost is its steps, whatever the run's length: say so where it outweighs the training
        cost = (f" ({len(run.lr_curve.lrs)} batches, against {run.steps_per_epoch * run.epochs} training batches)"
                if run.lr_curve else " (recorded by the run this one resumes)")
        console.print(f"optimizer.lr=auto: {run.lr_found:.3g} from the learning-rate range test{cost}",
                      highlight=False, soft_wrap=True)
    if len(splits.val) == 0:
        console.print("no validation split (dataset.val_fraction=0): the last epoch's weights are kept and tested.")


def _checkpointer(run: Run, folder: RunFolder, resolved: dict[str, Any], averaging: WeightAverage | None,
                  started: float, hooks: list[Hook]) -> Checkpointer:
    """Keeps the epoch ``trainer.select`` chooses; each write also saves the resumable training state (the
    loop's and that of the run's ``hooks``)."""
    dist = run.dist

    def describe_epoch(state: State) -> dict[str, Any]:
        return {"epoch": state.epoch + 1, "metrics": state.epoch_metrics, "config": resolved, HELD_OUT: run.held_out}

    def save(path: Path, weights: dict[str, torch.Tensor], facts: dict[str, Any]) -> None:
        if dist.main:
            save_model(path, weights, run.model.recipe, **facts)

    def save_train_state(state: State) -> None:
        payload = train_state.capture(state, run.loaders["train"], run.precision.scaler, run.data, hooks)
        payload["rng_per_process"] = dist.gather(payload["rng"])  # each process's dropout / augmentation draws
        payload["wall_time_s"] = time.perf_counter() - started
        payload["lr_found"] = run.lr_found
        if dist.main:
            train_state.save(folder.train_state, payload)

    return Checkpointer(folder, save, describe_epoch, selection(run.cfg.trainer.select),
                                save_every_s=run.cfg.trainer.save_every_s, after_write=save_train_state,
                                weights=averaging.applied if averaging else training_weights,
                                first_epoch=run.method.selectable_from, agree=dist.broadcast)


def _hooks(run: Run, folder: RunFolder, averaging: WeightAverage | None, checkpointer: Checkpointer,
           trackers: Trackers, console: Console) -> list[Hook]:
    trainer, dist = run.cfg.trainer, run.dist
    weights = averaging.applied if averaging else training_weights
    return [
        *([averaging] if averaging else []),  # first: the average includes this epoch before it is evaluated
        *([EvalHook(run.loaders["val"], run.device, run.precision, "val", weights)] if len(run.splits.val) else []),
        # Target labels are only ever used here, to measure; checkpoints are chosen on source val or on the
        # label-free validators (trainer.select).
        *([EvalHook(run.target_loader("test", False), run.device, run.precision, "target_test", weights),
           TargetValidators(run.target_loader("train", False), run.device, run.precision, weights)]
          if run.target else []),
        *([MetricsWriter(folder.metrics)] if dist.main else []),
        *([TrackingHook(trackers)] if trackers else []),
        *run.method.hooks(),  # before the checkpointer: the saved state includes what they change (unfrozen stages)
        checkpointer,
        *([ProgressHook(console, trainer.progress, trainer.log_every)] if dist.main else []),
    ]


def _finish(run: Run, state: State, checkpointer: Checkpointer, folder: RunFolder, averaging: WeightAverage | None,
            trackers: Trackers, started: float, console: Console) -> dict[str, Any]:
    """Scores the test split once, with the kept weights, and writes the run's tables, plots and summary."""
    cfg, dist = run.cfg, run.dist
    run.method.load_plain_state(checkpointer.best_state)
    test = evaluate(run.method, run.loaders["test"], run.device, run.precision)
    state.history.append({"epoch": state.best["epoch"], "split": "test", **test})
    metrics = metrics_frame(state.history)
    picks = validator_picks(state.history, run.method.selectable_from + 1) if run.target else []
    if dist.main:
        write_table(metrics, folder.metrics, markdown=True)
        if picks:  # what each label-free validator would have kept, next to the oracle
            write_table(pd.DataFrame(picks), folder.validators, markdown=True)
        if cfg.trainer.plots:
            plot_curves(metrics, folder.curves)
    if cfg.trainer.analyze and dist.main:  # the kept weights' features on 1,000 test images of each domain
        analyze_alignment(
            run.method.model,
            (cfg.dataset.name, sample_loader(run.splits.test, run.model.spec, cfg.dataset, run.device, 1000, cfg.seed)),
            (cfg.target.dataset.name, sample_loader(run.target.test, run.model.spec, cfg.target.dataset, run.device,
                                                    1000, cfg.seed)),
            list(run.splits.classes), run.device, run.precision, folder.path, cfg.seed)
    summary = _summary(run, state, folder, test, picks, averaging, time.perf_counter() - started)
    table = summary_frame(summary)
    if dist.main:
        folder.write_summary(summary)
        write_summary_md(folder, summary, {"Result": table, "Metrics per epoch": metrics})
        trackers.log_epoch(state.best["epoch"], epoch_metrics([state.history[-1]])[state.best["epoch"]])  # the test row
        trackers.finish_run(folder, summary)
    console.print(rich_record(table.iloc[0].to_dict(), title=f"{cfg.name}  ->  {folder.path}"), soft_wrap=True)
    return summary.to_json()


def _summary(run: Run, state: State, folder: RunFolder, test: dict[str, float], picks: list[dict[str, Any]],
             averaging: WeightAverage | None, seconds: float) -> RunSummary:
    cfg, splits = run.cfg, run.splits
    return RunSummary(
        name=cfg.name, status="ok", run_dir=str(folder.path), command=command_line(), dataset=cfg.dataset.name,
        backbone=cfg.backbone.name, method=cfg.method.name, epochs=state.epoch + 1, best=state.best,
        wall_time_s=seconds, versions=versions(),
        weights=str(run.source.path) if run.source else cfg.backbone.weights, seed=cfg.seed,
        classes=len(splits.classes), input=run.model.spec.brief(),
        samples={"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        skipped_files=splits.skipped, data_identity=run.data, data_notes=splits.notes,
        target=cfg.target.dataset.name if run.target else None, select=cfg.trainer.select,
        at_best={r["split"]: _metrics(r) for r in state.history if r["epoch"] == state.best["epoch"]
                 and r["split"] != "test"},
        target_test=state.epoch_metrics.get("target_test"), selection=picks, test=test,
        final=dict(state.epoch_metrics),
        processes=run.dist.world,  # dataset.batch_size is per process
        global_batch=cfg.dataset.batch_size * run.dist.world * cfg.trainer.accumulate,
        device=str(run.device), precision=run.precision.name, lr_found=run.lr_found,
        # after training: gradual unfreezing changes what trains
        facts={**run.method.describe(), **(averaging.describe() if averaging else {})},
    )


def write_lr_curve(curve: LrCurve, folder: RunFolder) -> None:
    """lr_find.csv (rate, smoothed loss, the chosen row) and lr_find.png."""
    table = pd.DataFrame({"lr": curve.lrs, "loss": curve.losses})
    table["chosen"] = table["lr"] == curve.suggestion
    write_table(table, folder.lr_find, markdown=False)
    plot_lr_find(curve.lrs, curve.losses, curve.suggestion, folder.lr_find.with_suffix(".png"))


def _weight_average(run: Run) -> WeightAverage | None:
    """The EMA / SWA hook the trainer settings ask for, or None."""
    cfg, method, epochs = run.cfg, run.method, run.epochs
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
    bn_loader = run.loader("train", False, sharded=False) if swa is not None else None
    return WeightAverage(method.model, ema, swa, bn_loader, run.device, run.precision, method.frozen_norms)


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("epoch", "split")}


def _same_data(folder: RunFolder, cfg: DictConfig) -> bool:
    """Whether a finished run's summary was computed from the data ``cfg`` reads now."""
    summary = folder.read_summary()
    recorded = summary.data_identity if summary else None
    return recorded == data_identity(build_data(cfg.dataset))


def _write_diverged(folder: RunFolder, cfg: DictConfig, state: State, err: Diverged, seconds: float) -> None:
    """The summary of a run stopped by a non-finite loss: what happened, where, and the epochs before it."""
    if state.history:
        write_table(metrics_frame(state.history), folder.metrics, markdown=True)
    folder.write_summary(RunSummary(
        name=cfg.name, status="diverged", run_dir=str(folder.path), command=command_line(), dataset=cfg.dataset.name,
        backbone=cfg.backbone.name, method=cfg.method.name, epochs=state.epoch, best=state.best or None,
        wall_time_s=seconds, versions=versions(), error=str(err), diverged_at=err.facts()))
