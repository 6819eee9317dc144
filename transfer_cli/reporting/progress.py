"""Progress display: rich bars on a terminal, one plain line per epoch in logs and CI."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from transfer_cli.engine.loop import Hook, State


def _fmt(metrics: dict[str, float], keys=("loss", "acc1", "entropy", "im", "snd")) -> str:
    return " ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)


def epoch_line(state: State) -> str:
    parts = [f"epoch {state.epoch + 1}/{state.max_epochs}"]
    for split, metrics in state.epoch_metrics.items():
        parts.append(f"{split} {_fmt(metrics)}")
    train = state.epoch_metrics.get("train", {})
    if "samples_per_s" in train:
        parts.append(f"{train['samples_per_s']:.0f} samples/s")
    return " | ".join(parts)


class ProgressHook(Hook):
    def __init__(self, console: Console, mode: str = "auto", log_every: int = 20) -> None:
        self.console = console
        self.mode = ("rich" if console.is_terminal else "plain") if mode == "auto" else mode
        self.log_every = max(1, log_every)
        self.progress: Progress | None = None

    def before_fit(self, state: State) -> None:
        if self.mode != "rich":
            return
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.progress.start()
        self.epochs = self.progress.add_task("epochs", total=state.max_epochs, completed=state.epoch, stats="")
        self.batches = self.progress.add_task("batches", total=state.steps_per_epoch, stats="")

    def before_epoch(self, state: State) -> None:
        self.start = time.perf_counter()
        if self.progress:
            self.progress.reset(self.batches, total=state.steps_per_epoch, description=f"epoch {state.epoch + 1}")

    def after_step(self, state: State) -> None:
        done = state.batch + 1
        if not self.progress or (done % self.log_every and done != state.steps_per_epoch):
            return
        rate = state.meter.count / max(time.perf_counter() - self.start, 1e-9)
        stats = f"{_fmt(state.meter.compute())} {rate:.0f} samples/s"
        self.progress.update(self.batches, completed=done, stats=stats)

    def after_epoch(self, state: State) -> None:
        if self.mode == "none":
            return
        self.console.print(epoch_line(state), highlight=False, soft_wrap=True)
        if self.progress:
            self.progress.update(self.epochs, completed=state.epoch + 1)

    def after_fit(self, state: State) -> None:
        if self.progress:
            self.progress.stop()


def plain_log(console: Console) -> Callable[[str], None]:
    """A one-line logger on ``console`` that prints messages as written (paths, [a, b] lists: no markup colours)."""

    def log(message: str) -> None:
        console.print(message, highlight=False, soft_wrap=True)

    return log
