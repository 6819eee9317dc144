"""Hydra/OmegaConf composition errors turned into one paragraph naming the key, the value and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from transfer_cli.errors import choices


def _omegaconf_cause(err: BaseException) -> OmegaConfBaseException | None:
    while err is not None:
        if isinstance(err, OmegaConfBaseException):
            return err
        err = err.__cause__ or err.__context__
    return None


def _allowed_keys(config_dir: Path, config_name: str, overrides: list[str], full_key: str) -> list[str] | None:
    """Keys next to ``full_key`` in the config composed without the override that failed."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    parent = full_key.rpartition(".")[0]
    kept = [o for o in overrides if not o.lstrip("+~").startswith(full_key) and not o.startswith("-")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir), version_base="1.3"):
            cfg = compose(config_name, overrides=kept)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return [str(k) for k in node] if isinstance(node, DictConfig) else None
    except Exception:  # noqa: BLE001 - best effort; the original message still gets shown
        return None
    finally:
        GlobalHydra.instance().clear()


def composition_message(err: Exception, config_dir: Path, config_name: str, overrides: list[str]) -> str:
    """One paragraph for a config Hydra could not compose: the key, the value, what is allowed."""
    cause = _omegaconf_cause(err)
    full_key = getattr(cause, "full_key", None)
    if cause is not None and full_key:
        value = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").split("=", 1)[0] == full_key), None)
        shown = f"{full_key}={value}" if value is not None else full_key
        reason = str(cause.msg if hasattr(cause, "msg") else cause).split("\n")[0]
        unknown_key = "not in struct" in reason or ("not in" in reason and "Key" in reason)
        if unknown_key:
            allowed = _allowed_keys(config_dir, config_name, overrides, full_key)
            parent = full_key.rpartition(".")[0] or "the top level"
            known = f" Keys under {parent}: {choices(allowed)}." if allowed else ""
            return f"{shown}: there is no option {full_key.rpartition('.')[2]!r}.{known}"
        return f"{shown} is not valid: {reason}."
    text = " ".join(str(err).split()).split(" Config search path:")[0]
    if "'backbone/" in text:
        text += ". Any torchvision classification model also works as backbone.name=NAME"
    return re.sub(r"\s*Available options in '(\w+)':", r" Available \1 options:", text)
