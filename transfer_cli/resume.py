"""Which run folder a run continues in: ``trainer.resume=auto|PATH`` for single runs, the job's own
folder for sweep jobs. A run resumes only with the config it was started with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from transfer_cli.errors import UserError
from transfer_cli.files import discard_if_only_hydra
from transfer_cli.run_files import STATE_FILE, RunFiles

IGNORED = ("trainer.resume", "trainer.overwrite")  # may differ between the first start and the resume


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    a, b = _flat(saved), _flat(current)
    keys = sorted(k for k in set(a) | set(b) if k not in IGNORED and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in keys]


def status(folder: Path) -> str:
    """fresh (nothing to resume), resumable, finished (summary ok) or stopped (diverged or failed)."""
    return RunFiles(folder).status().value


def saved_config(folder: Path) -> dict[str, Any] | None:
    path = RunFiles(folder).config
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def check_same_config(folder: Path, current: dict[str, Any]) -> None:
    saved = saved_config(folder)
    differences = config_differences(saved or {}, current)
    if differences:
        raise UserError(f"cannot resume {folder}: it was started with another config ({'; '.join(differences[:5])}"
                        f"{' ...' if len(differences) > 5 else ''}). Resume with the same overrides, or start a new run.")


def find_latest(runs_root: Path, current: dict[str, Any]) -> Path | None:
    """The newest unfinished run under ``runs_root`` (outputs/runs/<name>) with the same config."""
    if not runs_root.is_dir():
        return None
    for folder in sorted((p for p in runs_root.iterdir() if p.is_dir()), reverse=True):
        if status(folder) == "resumable" and not config_differences(saved_config(folder) or {}, current):
            return folder
    return None


def choose(resume: str, fresh_dir: Path, current: dict[str, Any]) -> Path | None:
    """The folder to continue in, or None to start fresh in ``fresh_dir``."""
    if resume == "none":
        return None
    if resume == "auto":
        found = find_latest(fresh_dir.parent, current)
    else:
        found = Path(resume).expanduser()
        state = status(found) if found.is_dir() else "missing"
        if state != "resumable":
            why = {"missing": "no such folder", "fresh": f"it has no checkpoints/{STATE_FILE} (the run stopped "
                   "before its first checkpoint, or is not a run folder)", "finished": "that run already finished",
                   "stopped": "that run stopped with an error or diverged; start a new run"}[state]
            raise UserError(f"trainer.resume={resume!r}: cannot resume: {why}.")
        check_same_config(found, current)
    if found is not None and found.resolve() != fresh_dir.resolve():
        discard_if_only_hydra(fresh_dir)  # Hydra made a folder for this start; the run continues elsewhere
    return found


def check_fresh(folder: Path, overwrite: bool) -> None:
    """A fresh run in ``folder`` (``hydra.run.dir`` given again) must not silently replace the checkpoints
    and tables a finished or interrupted run left there."""
    state = status(folder)
    if state == "fresh" and not RunFiles(folder).best.is_file() or overwrite:
        return
    what = {"finished": "a finished run", "resumable": "an unfinished run", "stopped": "a stopped run",
            "fresh": "checkpoints"}[state]
    raise UserError(f"{folder} already holds {what}: a new run there would overwrite its checkpoints and tables. "
                    "Use another folder (leave hydra.run.dir unset), resume it (trainer.resume="
                    f"{folder}), or replace it on purpose with trainer.overwrite=true.")
