"""`transfer train|eval|sweep`: Hydra composes the config; errors become one paragraph and exit 2."""

from __future__ import annotations

import json
import os
import string
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.markup import escape

from transfer_cli.config import conf_dir, register_schemas
from transfer_cli.config_errors import composition_message
from transfer_cli.errors import EXIT_DIVERGED, EXIT_USER_ERROR, UserError
from transfer_cli.files import atomic_write_text, discard_if_only_hydra
from transfer_cli.run_folder import RunFolder

USAGE = """usage: transfer COMMAND [OVERRIDES] [--cfg job] [--help]

`transfer train` with no overrides runs experiment=digits_transfer: small_cnn pretrained on digits 0-4
(cached), fine-tuned on digits 5-9 with 5 labels per class.

commands:
  rank     score backbones first     transfer rank dataset=usps "candidates=[resnet18,{name:mobilenet_v2,weights:DEFAULT}]"
  train    train one run             transfer train dataset=digits backbone=resnet18 method.freeze=2
  eval     evaluate a checkpoint     transfer eval checkpoint=outputs/runs/.../checkpoints/best.safetensors
  sweep    one run per combination   transfer sweep backbone=small_cnn,resnet18 seed=0,1,2
  predict  classify new images       transfer predict checkpoint=.../best.safetensors input=photos/
  export   ONNX / TorchScript        transfer export checkpoint=.../best.safetensors format=onnx quantize=dynamic
  explain  what a prediction rests on transfer explain checkpoint=.../best.safetensors [method=gradcam] [samples=8]
  analyze  domain alignment          transfer analyze checkpoint=.../best.safetensors [target=usps]
  report   rebuild/compare tables    transfer report outputs/sweeps/<time> [outputs/sweeps/<other>] [tracker=mlflow]

`transfer COMMAND --help` lists the config groups and every key."""

DEFAULT_EXPERIMENT = "digits_transfer"
err_console = Console(stderr=True)
_USER_FULL_ERROR = "TRANSFER_CLI_FULL_ERROR"  # the user's HYDRA_FULL_ERROR, kept while we set Hydra's


def config_groups() -> str:
    """The help's list of config groups and their options, read from conf/."""
    lines = []
    for group in sorted(p for p in conf_dir().iterdir() if p.is_dir() and p.name != "hydra"):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"{group.name}: {', '.join(options)}")
    return "\n".join(lines)


def print_help(config_name: str, overrides: list[str]) -> None:
    """``transfer train --help``: the help template of conf/ filled with the composed config. Hydra's own
    --help first lists every config group its plugins register (seconds of deep copies), to print these
    same lines."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    template = str(cfg.hydra.help.template)
    with open_dict(cfg):
        del cfg["hydra"]
    print(string.Template(template).safe_substitute(APP_CONFIG_GROUPS=config_groups(), CONFIG=OmegaConf.to_yaml(cfg)))


def _run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _in_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failure(err: BaseException) -> str:
    """A failed run or sweep job leaves error.json (status: failed) in its folder instead of an unexplained
    half-empty one; returns the one-paragraph message."""
    message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
    if _run_dir().is_dir():  # absent when the config was refused before anything ran
        record = {"status": "failed", "error": message, "traceback": traceback.format_exc()}
        atomic_write_text(RunFolder(_run_dir()).error, json.dumps(record, indent=2))
    return message


def _job(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Single runs: a UserError exits 2 with one paragraph, a diverged run 3. Sweep jobs: any failure is
    recorded and the sweep continues (NaN tells a Hydra sweeper such as Optuna that the trial failed)."""

    def run(cfg: DictConfig) -> Any:
        from transfer_cli.engine.loop import Diverged  # here, not at import: --help and --cfg need no torch

        try:
            return task(cfg)
        except Exception as err:
            # A diverged run's summary.json already says what happened; anything else gets error.json.
            message = str(err) if isinstance(err, Diverged) else _record_failure(err)
            if os.environ.get(_USER_FULL_ERROR) == "1":
                raise
            if _in_multirun():
                _report(f"job {HydraConfig.get().job.num} {'diverged' if isinstance(err, Diverged) else 'failed'}: {message}")
                return float("nan")
            if isinstance(err, (UserError, Diverged)):
                _report(message)
                raise SystemExit(EXIT_DIVERGED if isinstance(err, Diverged) else EXIT_USER_ERROR) from None
            raise

    return run


def _job_threads(cfg: DictConfig) -> int | None:
    """Parallel sweep jobs share the cores: each gets its slice unless trainer.threads says otherwise."""
    if cfg.trainer.threads or not _in_multirun():
        return cfg.trainer.threads
    n_jobs = OmegaConf.select(HydraConfig.get().launcher, "n_jobs", default=None)
    if not n_jobs or n_jobs == 1:
        return None
    cores = os.cpu_count() or 1
    return max(1, cores // (cores if n_jobs < 0 else n_jobs))


@_job
def _train(cfg: DictConfig) -> float:
    from transfer_cli.reporting.tracking.background import open_trackers

    trackers = None
    try:
        # The trackers start first, in a child process, so that their libraries' start-up runs beside torch's
        # import (with several processes, process 0 starts its own in run_train).
        if cfg.trainer.devices == 1 and not os.environ.get("WORLD_SIZE"):
            trackers = open_trackers(OmegaConf.to_container(cfg.tracker, resolve=True), cfg.output_dir)
        from transfer_cli.validation import validate

        validate(cfg)
    except UserError:
        if trackers is not None:
            trackers.discard()
        discard_if_only_hydra(_run_dir())  # nothing ran: leave no run folder behind
        raise
    from transfer_cli.engine import distributed
    from transfer_cli.engine.selection import selection
    from transfer_cli.train import run_train

    cfg.trainer.threads = _job_threads(cfg)
    if cfg.trainer.devices > 1 and not distributed.launched():
        summary = _launch_processes(cfg)
    else:
        try:
            summary = run_train(cfg, _run_dir(), sweep_job=_in_multirun(), trackers=trackers)
        finally:
            distributed.shutdown()
    return selection(cfg.trainer.select).objective(summary["best"])  # what a sweeper (Optuna) maximises


def _launch_processes(cfg: DictConfig) -> dict[str, Any]:
    """``trainer.devices=N``: torchrun's elastic agent (torch.distributed.run) starts N copies of this very
    command on this machine, all writing into this run's folder; returns the summary process 0 wrote."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from transfer_cli.engine.loop import Diverged
    from transfer_cli.run_folder import choose_resume

    folder = RunFolder(_run_dir())
    if not _in_multirun():  # resuming: the processes go straight to the run they continue
        folder = choose_resume(str(cfg.trainer.resume), folder.path, OmegaConf.to_container(cfg, resolve=True)) or folder
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.run.dir=")]
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={cfg.trainer.devices}", "--module",
                                         "transfer_cli", "train", *overrides, f"hydra.run.dir={folder.path}"])
    hydra_setting = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = os.environ.get(_USER_FULL_ERROR, "0")  # the processes see the user's setting
    try:
        run(args)
    except ChildFailedError as err:
        summary = folder.read_summary()
        if summary is not None and summary.status == "diverged":
            raise Diverged.from_facts(summary.diverged_at) from None
        rank, first = err.get_first_failure()
        others = sorted(r for r in err.failures if r != rank)
        stopped = f"; torchrun then stopped process(es) {', '.join(map(str, others))}" if others else ""
        raise UserError(f"trainer.devices={cfg.trainer.devices}: the run failed: process {rank} exited with code "
                        f"{first.exitcode} first (what it printed is above){stopped}.") from None
    finally:
        os.environ["HYDRA_FULL_ERROR"] = hydra_setting or "1"
    return folder.read_summary().to_json()


def _scoring(module: str, function: str) -> Callable[[DictConfig], Any]:
    """eval, predict, export, analyze: their keys checked, then ``module.function(cfg, run_dir)``."""

    @_job
    def run(cfg: DictConfig) -> None:
        import importlib

        from transfer_cli.validation import validate_command

        validate_command(cfg)
        getattr(importlib.import_module(f"transfer_cli.{module}"), function)(cfg, _run_dir())

    return run


def _checkpoint_dataset_changes(args: list[str]) -> list[str]:
    """eval, export and analyze take the dataset from the checkpoint unless dataset=NAME is given, and the
    composed config cannot hold it (dataset: null), so ``dataset.root=DIR`` alone has nothing to change:
    such overrides travel as ``dataset_changes.KEY`` and are applied over the checkpoint's dataset."""
    keys = [a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a and not a.startswith("-")]
    if "dataset" in keys:
        return args
    return [f"+dataset_changes.{a.lstrip('+').removeprefix('dataset.')}" if a.lstrip("+").startswith("dataset.")
            and "=" in a else a for a in args]


def _explain_args(args: list[str]) -> list[str]:
    """``method=NAME`` names the attribution method of explain, but Hydra reads ``method=`` as the training
    method's config group (conf/method/): it travels as ``attribution=NAME``."""
    return _checkpoint_dataset_changes([f"attribution={a.split('=', 1)[1]}" if a.startswith("method=") else a
                                        for a in args])


def _sweep_resume(args: list[str]) -> list[str]:
    """``sweep.resume=PATH|auto`` -> run the sweep again into that folder (``hydra.sweep.dir``): finished
    jobs are kept, unfinished ones resume from their checkpoint, failed and missing ones run (run_train
    decides per job folder). Hydra's own multirun has no resume; this is ours."""
    from transfer_cli.reporting.sweep import SWEEP_CONFIG, is_sweep_folder, sweep_folders, sweep_overrides

    given = [a for a in args if a.startswith("sweep.resume=")]
    if not given:
        return args
    value = given[-1].split("=", 1)[1]
    rest = [a for a in args if not a.startswith("sweep.resume=")]
    wanted = [a for a in rest if "=" in a and not a.startswith(("-", "hydra."))]
    if value == "auto":
        output_dir = next((a.split("=", 1)[1] for a in rest if a.startswith("output_dir=")), "outputs")
        found = next((f for f in sweep_folders(Path(output_dir, "sweeps")) if sorted(sweep_overrides(f)) == sorted(wanted)),
                     None)
        if found is None:
            raise UserError(f"sweep.resume=auto: no sweep under {output_dir}/sweeps was started with these "
                            f"overrides ({' '.join(wanted)}). Give its folder: sweep.resume=PATH.")
    else:
        found = Path(value).expanduser()
        if not is_sweep_folder(found):
            raise UserError(f"sweep.resume={value!r} is not a sweep folder (it has no {SWEEP_CONFIG}).")
        if sorted(sweep_overrides(found)) != sorted(wanted):  # the same sweep, whatever the order of its overrides
            raise UserError(f"sweep.resume={value!r} was started with the overrides {' '.join(sweep_overrides(found))}, "
                            f"not {' '.join(wanted)}: resume it with the same ones.")
    err_console.print(f"resuming sweep {found}", highlight=False)
    return [*rest, f"hydra.sweep.dir={found}"]


def _default_experiment(args: list[str]) -> list[str]:
    """Bare `transfer train`: the default transfer."""
    args = _tracker_keys_chosen(args)
    return args if any("=" in a and not a.startswith("-") for a in args) else [*args, f"experiment={DEFAULT_EXPERIMENT}"]


def _tracker_keys_chosen(args: list[str]) -> list[str]:
    """``tracker.mlflow.KEY=...`` needs mlflow chosen (``tracker=mlflow``): the node of an unchosen tracker is
    null, and Hydra would fail on it with an internal assertion."""
    chosen = " ".join(a.split("=", 1)[1] for a in args if a.startswith("tracker=")).translate(str.maketrans("[],", "   "))
    for arg in args:
        parts = arg.split("=", 1)[0].lstrip("+").split(".")
        if len(parts) > 2 and parts[0] == "tracker" and parts[1] not in chosen.split():
            raise UserError(f"{arg} sets a key of tracker {parts[1]}, which is not chosen: add tracker={parts[1]} "
                            f"(several: tracker=[{parts[1]},tensorboard]).")
    return args


@dataclass(frozen=True)
class Command:
    """A Hydra command: its config (conf/<config>.yaml), the task Hydra runs per job, whether it sweeps, and
    what its overrides need before Hydra reads them."""

    config: str
    task: Callable[[DictConfig], Any]
    multirun: bool = False
    prepare: Callable[[list[str]], list[str]] = list


COMMANDS: dict[str, Command] = {
    "train": Command("config", _train, prepare=_default_experiment),
    "sweep": Command("config", _train, multirun=True, prepare=lambda args: _sweep_resume(_tracker_keys_chosen(args))),
    "eval": Command("eval", _scoring("evaluate", "run_eval"), prepare=_checkpoint_dataset_changes),
    "predict": Command("predict", _scoring("predict", "run_predict")),
    "export": Command("export", _scoring("export", "run_export"), prepare=_checkpoint_dataset_changes),
    "analyze": Command("analyze", _scoring("analyze", "run_analyze"), prepare=_checkpoint_dataset_changes),
    "explain": Command("explain", _scoring("explain", "run_explain"), prepare=_explain_args),
    "rank": Command("rank", _scoring("rank", "run_rank")),
}


def _report(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # [a, b] is text


def _exit_on_failed_jobs(status_file: Path) -> None:
    """Exit 1 when the sweep's callback listed jobs that did not end ok, could not write the sweep's tables,
    or never reported (a sweep whose outcome is unknown must not look like a success)."""
    if not status_file.is_file():
        _report("the sweep ended without its report (hydra.callbacks.sweep_report did not run), so whether every "
                "job finished is unknown; `transfer report SWEEP_DIR` rebuilds the tables from the job folders.")
        sys.exit(1)
    status = json.loads(status_file.read_text())
    status_file.unlink()
    if "report_error" in status:
        _report(f"the sweep's jobs ended but its tables in {status['sweep_dir']} could not be written "
                f"({status['report_error']}); the jobs' own folders are complete, and `transfer report {status['sweep_dir']}` "
                "rebuilds the tables (with the traceback if it fails again).")
        sys.exit(1)
    failed = status["failed"]
    if failed:
        lines = [f"job {f['job']} ({f['status']}): {f.get('error') or ''}" for f in failed]
        _report(f"{len(failed)} sweep job(s) did not finish; the others are in the tables.\n  " + "\n  ".join(lines))
        sys.exit(1)


def _report_command(args: list[str]) -> None:
    from transfer_cli.report import run_report

    if args and args[0] in ("-h", "--help"):
        print("usage: transfer report DIR [DIR ...] [tracker=NAME|[A,B] [tracker.NAME.KEY=VALUE ...]]\n\n"
              "Rebuild tables and plots of a run or sweep folder; with several sweep folders, compare them in one "
              "table (written under outputs/reports/). With tracker=...: also log the finished runs (a sweep: as a "
              "parent run with its jobs) to those trackers; runs a store already holds are not logged again.")
        return
    tracker = [a for a in args if a.startswith("tracker")]
    try:
        run_report([a for a in args if a not in tracker], tracker=tracker)
    except UserError as err:
        _report(str(err))
        sys.exit(EXIT_USER_ERROR)


PLAIN_COMMANDS: dict[str, Callable[[list[str]], None]] = {"report": _report_command}  # no Hydra config


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else EXIT_USER_ERROR)
    command, rest = argv[0], argv[1:]
    if command in PLAIN_COMMANDS:
        PLAIN_COMMANDS[command](rest)
        return
    if command not in COMMANDS:
        _report(f"unknown command {command!r}. Commands: {', '.join([*COMMANDS, *PLAIN_COMMANDS])}. "
                "See `transfer --help`.")
        sys.exit(EXIT_USER_ERROR)
    spec = COMMANDS[command]
    config_name, multirun = spec.config, spec.multirun
    try:
        rest = spec.prepare(rest)
    except UserError as err:
        _report(str(err))
        sys.exit(EXIT_USER_ERROR)
    register_schemas()
    # Hydra refuses --multirun next to --cfg/--info/--help; those only inspect the config anyway.
    inspect_only = any(a.split("=")[0] in ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help") for a in rest)
    multirun = multirun and not inspect_only
    status_file = Path(tempfile.gettempdir()) / f"transfer_sweep_{os.getpid()}.json"
    if multirun:
        rest = [*rest, f"hydra.callbacks.sweep_report.status_file={status_file}"]
    sys.argv = [f"transfer {command}", *(["--multirun"] if multirun else []), *rest]
    app = hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")(spec.task)
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    if any(a in ("--help", "-h") for a in rest):
        app = partial(print_help, config_name, overrides)

    users_setting = os.environ.get("HYDRA_FULL_ERROR")
    show_traceback = users_setting == "1"
    os.environ[_USER_FULL_ERROR] = "1" if show_traceback else "0"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's own reporter
    try:
        _run_app(app, multirun, status_file, show_traceback, config_name, overrides)
    finally:  # main() may run again in this process (tests, notebooks): give the user's setting back
        if users_setting is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = users_setting


def _run_app(app: Callable[[], Any], multirun: bool, status_file: Path, show_traceback: bool, config_name: str,
             overrides: list[str]) -> None:
    try:
        app()
        if multirun:
            _exit_on_failed_jobs(status_file)
    except (UserError, ConfigCompositionException, MissingConfigException, OverrideParseException, OmegaConfBaseException) as err:
        if show_traceback:
            raise
        message = str(err) if isinstance(err, UserError) else composition_message(err, conf_dir(), config_name, overrides)
        _report(message)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        _report("interrupted; checkpoints and tables written so far are kept.")
        sys.exit(130)
    except Exception as err:
        if show_traceback:
            raise
        _report(f"{type(err).__name__}: {err}. Set HYDRA_FULL_ERROR=1 for the full traceback.")
        sys.exit(1)
