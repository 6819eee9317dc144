"""`transfer train|eval|sweep`: Hydra composes the config; errors become one paragraph and exit 2."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console

from transfer_cli.config import register_schemas, validate
from transfer_cli.errors import EXIT_USER_ERROR, UserError, choices

USAGE = """usage: transfer COMMAND [OVERRIDES] [--cfg job] [--help]

commands:
  train    train one run             transfer train dataset=digits backbone=resnet18 method.freeze=2
  eval     evaluate a checkpoint     transfer eval checkpoint=outputs/runs/.../checkpoints/best.safetensors
  sweep    one run per combination   transfer sweep backbone=small_cnn,resnet18 seed=0,1,2

`transfer COMMAND --help` lists the config groups and every key."""

err_console = Console(stderr=True)
_USER_FULL_ERROR = "TRANSFER_CLI_FULL_ERROR"  # the user's HYDRA_FULL_ERROR, kept while we set Hydra's


def conf_dir() -> Path:
    """Configs ship inside the wheel; in a source checkout they sit at the repository top level."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def _run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def _user_errors_exit(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Report a UserError inside the job, where Hydra would otherwise add its own failure line."""

    def run(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except UserError as err:
            if os.environ.get(_USER_FULL_ERROR) == "1":
                raise
            _report(str(err))
            raise SystemExit(EXIT_USER_ERROR) from None

    return run


@_user_errors_exit
def _train(cfg: DictConfig) -> float:
    from transfer_cli.train import run_train

    validate(cfg)
    summary = run_train(cfg, _run_dir())
    return float(summary["best"]["value"])  # what a Hydra sweeper (Optuna) maximises


@_user_errors_exit
def _eval(cfg: DictConfig) -> None:
    from transfer_cli.evaluate import run_eval

    run_eval(cfg, _run_dir())


COMMANDS: dict[str, tuple[str, Callable[[DictConfig], Any], bool]] = {
    "train": ("config", _train, False),
    "sweep": ("config", _train, True),
    "eval": ("eval", _eval, False),
}


def _omegaconf_cause(err: BaseException) -> OmegaConfBaseException | None:
    while err is not None:
        if isinstance(err, OmegaConfBaseException):
            return err
        err = err.__cause__ or err.__context__
    return None


def _allowed_keys(config_name: str, overrides: list[str], full_key: str) -> list[str] | None:
    """Keys next to ``full_key`` in the config composed without the override that failed."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    parent = full_key.rpartition(".")[0]
    kept = [o for o in overrides if not o.lstrip("+~").startswith(full_key) and not o.startswith("-")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name, overrides=kept)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return [str(k) for k in node] if isinstance(node, DictConfig) else None
    except Exception:  # noqa: BLE001 - best effort; the original message still gets shown
        return None
    finally:
        GlobalHydra.instance().clear()


def _composition_message(err: Exception, config_name: str, overrides: list[str]) -> str:
    cause = _omegaconf_cause(err)
    full_key = getattr(cause, "full_key", None)
    if cause is not None and full_key:
        value = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").split("=", 1)[0] == full_key), None)
        shown = f"{full_key}={value}" if value is not None else full_key
        reason = str(cause.msg if hasattr(cause, "msg") else cause).split("\n")[0]
        if "not in struct" in reason or "not in" in reason and "Key" in reason:
            allowed = _allowed_keys(config_name, overrides, full_key)
            parent = full_key.rpartition(".")[0] or "the top level"
            known = f" Keys under {parent}: {choices(allowed)}." if allowed else ""
            return f"{shown}: there is no option {full_key.rpartition('.')[2]!r}.{known}"
        return f"{shown} is not valid: {reason}."
    text = " ".join(str(err).split()).split(" Config search path:")[0]
    if "'backbone/" in text:
        text += ". Any torchvision classification model also works as backbone.name=NAME"
    return re.sub(r"\s*Available options in '(\w+)':", r" Available \1 options:", text)


def _report(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else EXIT_USER_ERROR)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _report(f"unknown command {command!r}. Commands: {', '.join(COMMANDS)}. See `transfer --help`.")
        sys.exit(EXIT_USER_ERROR)
    config_name, task, multirun = COMMANDS[command]
    register_schemas()
    sys.argv = [f"transfer {command}", *(["--multirun"] if multirun else []), *rest]
    app = hydra.main(config_path=str(conf_dir()), config_name=config_name, version_base="1.3")(task)

    show_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ[_USER_FULL_ERROR] = "1" if show_traceback else "0"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's own reporter
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    try:
        app()
    except (UserError, ConfigCompositionException, MissingConfigException, OverrideParseException, OmegaConfBaseException) as err:
        if show_traceback:
            raise
        message = str(err) if isinstance(err, UserError) else _composition_message(err, config_name, overrides)
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
