"""TensorBoard: one event folder per run (``<run>/tensorboard``): scalars per split with the epoch as step,
the hparams view (config -> final metrics), and the run's plots as images. A sweep's jobs sit side by side
under the sweep folder, so ``tensorboard --logdir SWEEP`` compares them."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from transfer_cli.reporting.tracking.base import Tracker
from transfer_cli.reporting.tracking.record import RunRecord


class TensorboardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, dir: str) -> None:  # noqa: A002 - the config key
        self.subdir = dir
        self.writer: SummaryWriter | None = None
        self.params: dict[str, Any] = {}

    def start(self, record: RunRecord, resumed_after: int) -> None:
        folder = record.run_dir / self.subdir
        if not resumed_after:  # a fresh start (or a backfill) writes the folder anew: no steps twice
            shutil.rmtree(folder, ignore_errors=True)
        self.params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in record.params.items()}
        # resumed: what the stopped start logged after its last checkpoint is trained again, so it is purged
        self.writer = SummaryWriter(str(folder), purge_step=resumed_after + 1 if resumed_after else None)

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, status: str, final: Mapping[str, float], notes: Mapping[str, str], files: list[Path]) -> None:
        for summary in hparams({**self.params, "status": status}, {f"final/{k}": v for k, v in final.items()}):
            self.writer.file_writer.add_summary(summary)
        for key, value in final.items():
            self.writer.add_scalar(f"final/{key}", value, 0)
        for path in files:
            if path.suffix == ".png":
                self.writer.add_image(f"plots/{path.stem}", _rgb(path), 0, dataformats="HWC")
        self.writer.close()

    def holds(self, record: RunRecord) -> bool:
        return False  # a backfill rewrites the run's event folder, which leaves no duplicates


def _rgb(path: Path) -> Any:
    from matplotlib.image import imread

    image = imread(path)
    return image[..., :3]
