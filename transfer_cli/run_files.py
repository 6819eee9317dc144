"""What a run folder holds, by name: the one place its file names are spelled, and what they say about it.

    <run>/config.yaml  summary.json  summary.md  error.json  metrics.csv(.md)  checkpoints/{best,last}.safetensors
                       checkpoints/train_state.pt
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_FILE = "train_state.pt"


class RunStatus(str, enum.Enum):
    FRESH = "fresh"  # nothing to resume
    RESUMABLE = "resumable"  # a training state, no summary yet
    FINISHED = "finished"  # summary.json with status ok
    STOPPED = "stopped"  # diverged or failed


@dataclass(frozen=True)
class RunFiles:
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
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.safetensors"

    @property
    def train_state(self) -> Path:
        return self.checkpoints / STATE_FILE

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json as written, or None when it is absent or unreadable."""
        try:
            summary = json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    def status(self) -> RunStatus:
        if self.summary.is_file():
            summary = self.read_summary()
            return RunStatus.FINISHED if summary is not None and summary.get("status", "ok") == "ok" else RunStatus.STOPPED
        return RunStatus.RESUMABLE if self.train_state.is_file() else RunStatus.FRESH
