"""`transfer train|eval|sweep`: Hydra composes the config; errors become one paragraph and exit 2."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console

from transfer_cli.config import register_schemas
from transfer_cli.config_errors import composition_message
from transfer_cli.errors import EXIT_DIVERGED, EXIT_USER_ERROR, UserError
from transfer_cli.files import atomic_write_text

USAGE = """usage: transfer COMMAND [OVERRIDES] [--cfg job] [--help]

`transfer train` with no overrides runs experiment=digits_transfer: small_cnn pretrained on digits 0-4
(cached), fine-tuned on digits 5-9 with 5 labels per class.

commands:
  train    train one run             transfer train dataset=digits backbone=resnet18 method.freeze=2
  eval     evaluate a checkpoint     transfer eval checkpoint=outputs/runs/.../checkpoints/best.safetensors
  sweep    one run per combination   transfer sweep backbone=small_cnn,resnet18 seed=0,1,2
  report   rebuild/compare tables    transfer report outputs/sweeps/<time> [outputs/sweeps/<other>]

`transfer COMMAND --help` lists the config groups and every key."""

DEFAULT_EXPERIMENT = "digits_transfer"
err_console = Console(stderr=True)
_USER_FULL_ERROR = "TRANSFER_CLI_FULL_ERROR"  # the user's HYDRA_FULL_ERROR, kept while we set Hydra's


def conf_dir() -> Path:
    """Configs ship inside the wheel; in a source checkout they sit at the repository top level."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def _run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _in_multirun() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failure(err: BaseException) -> str:
    """A failed run or sweep job leaves error.json (status: failed) in its folder instead of an unexplained
    half-empty one; returns the one-paragraph message."""
    message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
    record = {"status": "failed", "error": message, "traceback": traceback.format_exc()}
    atomic_write_text(_run_dir() / "error.json", json.dumps(record, indent=2))
    return message


def _job(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Single runs: a UserError exits 2 with one paragraph, a diverged run 3. Sweep jobs: any failure is
    recorded and the sweep continues (NaN tells a Hydra sweeper such as Optuna that the trial failed)."""
    from transfer_cli.engine.loop import Diverged

    def run(cfg: DictConfig) -> Any:
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
    from transfer_cli.train import run_train
    from transfer_cli.validation import validate

    validate(cfg)
    cfg.trainer.threads = _job_threads(cfg)
    summary = run_train(cfg, _run_dir())
    best = summary["best"]
    return float(best["value"]) if best["split"] == "val" else float("nan")  # what Optuna maximises


@_job
def _eval(cfg: DictConfig) -> None:
    from transfer_cli.evaluate import run_eval

    run_eval(cfg, _run_dir())


COMMANDS: dict[str, tuple[str, Callable[[DictConfig], Any], bool]] = {
    "train": ("config", _train, False),
    "sweep": ("config", _train, True),
    "eval": ("eval", _eval, False),
}


def _report(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def _exit_on_failed_jobs(status_file: Path) -> None:
    """Exit 1 when the sweep's callback listed jobs that did not end ok."""
    if not status_file.is_file():
        return
    failed = json.loads(status_file.read_text())["failed"]
    status_file.unlink()
    if failed:
        lines = [f"job {f['job']} ({f['status']}): {f.get('error') or ''}" for f in failed]
        _report(f"{len(failed)} sweep job(s) did not finish; the others are in the tables.\n  " + "\n  ".join(lines))
        sys.exit(1)


def _report_command(args: list[str]) -> None:
    from transfer_cli.report import run_report

    if args and args[0] in ("-h", "--help"):
        print("usage: transfer report DIR [DIR ...]\n\nRebuild tables and plots of a run or sweep folder; "
              "with several sweep folders, compare them in one table (written under outputs/reports/).")
        return
    try:
        run_report(args)
    except UserError as err:
        _report(str(err))
        sys.exit(EXIT_USER_ERROR)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else EXIT_USER_ERROR)
    command, rest = argv[0], argv[1:]
    if command == "report":
        _report_command(rest)
        return
    if command not in COMMANDS:
        _report(f"unknown command {command!r}. Commands: {', '.join(COMMANDS)}. See `transfer --help`.")
        sys.exit(EXIT_USER_ERROR)
    config_name, task, multirun = COMMANDS[command]
    if command == "train" and not any("=" in a and not a.startswith("-") for a in rest):
        rest = [*rest, f"experiment={DEFAULT_EXPERIMENT}"]  # bare `transfer train`: the default transfer
    register_schemas()
    # Hydra refuses --multirun next to --cfg/--info/--help; those only inspect the config anyway.
    inspect_only = any(a.split("=")[0] in ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help") for a in rest)
    multirun = multirun and not inspect_only
    status_file = Path(tempfile.gettempdir()) / f"transfer_sweep_{os.getpid()}.json"
    if multirun:
        rest = [*rest, f"hydra.callbacks.sweep_report.status_file={status_file}"]
    sys.argv = [f"transfer {command}", *(["--multirun"] if multirun else []), *rest]
    app = hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")(task)

    show_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ[_USER_FULL_ERROR] = "1" if show_traceback else "0"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's own reporter
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
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
