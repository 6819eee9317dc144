"""A run folder: the one place its file names are spelled, what state the run in it is in, and whether a new
start may continue in it (``trainer.resume=auto|PATH`` for single runs, the job's own folder for sweep jobs).

    <run>/config.yaml  summary.json  summary.md  error.json  metrics.csv(.md)  validators.csv(.md)  curves.png
          lr_find.csv/png  checkpoints/{best,last}.safetensors  checkpoints/train_state.pt

A run resumes only with the config it was started with, and only on the data it was started on.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from transfer_cli.errors import UserError
from transfer_cli.files import atomic_write_text, discard_if_only_hydra, remove_orphan_tmp

# May differ between the first start and the resume: how to start, and where the run is also logged.
IGNORED = ("trainer.resume", "trainer.overwrite", "tracker.")


class RunStatus(str, enum.Enum):
    FRESH = "fresh"  # nothing to resume
    RESUMABLE = "resumable"  # a training state, no summary yet
    FINISHED = "finished"  # summary.json with status ok
    STOPPED = "stopped"  # diverged or failed


@dataclass
class RunSummary:
    """What a run achieved, with what, on what: built once where the run ends (finished or diverged), written
    as summary.json, and read back through this type by sweeps, reports and resumes. Every field is optional
    on reading: a summary written by an older version, or by hand, still reads."""

    name: str | None = None
    status: str = "ok"  # ok | diverged
    run_dir: str | None = None
    command: str | None = None
    dataset: str | None = None
    backbone: str | None = None
    method: str | None = None
    epochs: int | None = None  # epochs trained
    best: dict[str, Any] | None = None  # the kept epoch: epoch, split, metric, value
    wall_time_s: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    # a finished run
    weights: str | None = None
    seed: int | None = None
    classes: int | None = None
    input: dict[str, Any] | None = None  # the preprocessing used: size, resize, mean, std / the tokenizer
    samples: dict[str, int] | None = None
    skipped_files: int | None = None
    data_identity: str | None = None
    data_notes: list[str] | None = None
    target: str | None = None
    select: str | None = None
    at_best: dict[str, Any] | None = None  # every split's metrics at the kept epoch
    target_test: dict[str, Any] | None = None  # the last epoch's target test metrics
    selection: list[dict[str, Any]] | None = None  # what each label-free validator would have kept
    test: dict[str, Any] | None = None
    final: dict[str, Any] | None = None  # every split's metrics at the last epoch
    processes: int | None = None
    global_batch: int | None = None
    device: str | None = None
    precision: str | None = None
    lr_found: float | None = None  # optimizer.lr=auto: the rate the range test chose
    # what the method and the weight average say of themselves (params_trainable, weight_average ...): top-level
    # keys of summary.json
    facts: dict[str, Any] = field(default_factory=dict)
    # a diverged run
    error: str | None = None
    diverged_at: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """summary.json's object: a finished run's fields (None included), or a diverged run's."""
        skipped = ("facts", *(_FINISHED_ONLY if self.status == "diverged" else _DIVERGED_ONLY))
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skipped}
        return {**out, **self.facts}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        names = {f.name for f in fields(cls)} - {"facts"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   facts={k: v for k, v in data.items() if k not in names})


_DIVERGED_ONLY = ("error", "diverged_at")
_FINISHED_ONLY = ("weights", "seed", "classes", "input", "samples", "skipped_files", "data_identity", "data_notes",
                  "target", "select", "at_best", "target_test", "selection", "test", "final", "processes",
                  "global_batch", "device", "precision", "lr_found")


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def summary_md(self) -> Path:
        return self.path / "summary.md"

    @property
    def error(self) -> Path:
        return self.path / "error.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def validators(self) -> Path:
        return self.path / "validators.csv"

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    @property
    def lr_find(self) -> Path:
        """optimizer.lr=auto: the range test's curve (lr_find.csv, and lr_find.png beside it)."""
        return self.path / "lr_find.csv"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.safetensors"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.safetensors"

    @property
    def train_state(self) -> Path:
        return self.checkpoints / "train_state.pt"

    def read_summary(self) -> RunSummary | None:
        """summary.json, or None when it is absent or unreadable."""
        try:
            summary = json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None
        return RunSummary.from_json(summary) if isinstance(summary, dict) else None

    def write_summary(self, summary: RunSummary) -> None:
        atomic_write_text(self.summary, json.dumps(summary.to_json(), indent=2, default=str) + "\n")

    def status(self) -> RunStatus:
        if self.summary.is_file():
            summary = self.read_summary()
            return RunStatus.FINISHED if summary is not None and summary.status == "ok" else RunStatus.STOPPED
        return RunStatus.RESUMABLE if self.train_state.is_file() else RunStatus.FRESH

    def saved_config(self) -> dict[str, Any] | None:
        return yaml.safe_load(self.config.read_text()) if self.config.is_file() else None

    def check_same_config(self, current: dict[str, Any]) -> None:
        differences = config_differences(self.saved_config() or {}, current)
        if differences:
            raise UserError(f"cannot resume {self.path}: it was started with another config "
                            f"({'; '.join(differences[:5])}{' ...' if len(differences) > 5 else ''}). Resume with "
                            "the same overrides, or start a new run.")

    def check_fresh(self, overwrite: bool) -> None:
        """A fresh run here (``hydra.run.dir`` given again) must not silently replace the checkpoints and tables a
        finished or interrupted run left."""
        state = self.status()
        if state is RunStatus.FRESH and not self.best.is_file() or overwrite:
            return
        what = {RunStatus.FINISHED: "a finished run", RunStatus.RESUMABLE: "an unfinished run",
                RunStatus.STOPPED: "a stopped run", RunStatus.FRESH: "checkpoints"}[state]
        raise UserError(f"{self.path} already holds {what}: a new run there would overwrite its checkpoints and "
                        "tables. Use another folder (leave hydra.run.dir unset), resume it (trainer.resume="
                        f"{self.path}), or replace it on purpose with trainer.overwrite=true.")

    def clear_stale(self) -> None:
        """A fresh start: what an earlier attempt here left (its outcome, its training state) no longer holds."""
        for stale in (self.summary, self.error, self.train_state):
            stale.unlink(missing_ok=True)

    def remove_orphan_tmp(self) -> list[Path]:
        return remove_orphan_tmp(self.path)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    a, b = flatten(saved), flatten(current)
    keys = sorted(k for k in set(a) | set(b) if not k.startswith(IGNORED) and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in keys]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"dataset.name": ..., "optimizer.lr": ...}`` (lists stay values)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def find_latest(runs_root: Path, current: dict[str, Any]) -> RunFolder | None:
    """The newest unfinished run under ``runs_root`` (outputs/runs/<name>) with the same config."""
    if not runs_root.is_dir():
        return None
    for path in sorted((p for p in runs_root.iterdir() if p.is_dir()), reverse=True):
        folder = RunFolder(path)
        if folder.status() is RunStatus.RESUMABLE and not config_differences(folder.saved_config() or {}, current):
            return folder
    return None


def choose_resume(resume: str, fresh: Path, current: dict[str, Any]) -> RunFolder | None:
    """The folder ``trainer.resume`` continues in, or None to start fresh in ``fresh``."""
    if resume == "none":
        return None
    if resume == "auto":
        found = find_latest(fresh.parent, current)
    else:
        found = RunFolder(Path(resume).expanduser())
        state = found.status().value if found.path.is_dir() else "missing"
        if state != RunStatus.RESUMABLE:
            why = {"missing": "no such folder", "fresh": f"it has no {found.train_state.relative_to(found.path)} "
                   "(the run stopped before its first checkpoint, or is not a run folder)",
                   "finished": "that run already finished",
                   "stopped": "that run stopped with an error or diverged; start a new run"}[state]
            raise UserError(f"trainer.resume={resume!r}: cannot resume: {why}.")
        found.check_same_config(current)
    if found is not None and found.path.resolve() != fresh.resolve():
        discard_if_only_hydra(fresh)  # Hydra made a folder for this start; the run continues elsewhere
    return found
