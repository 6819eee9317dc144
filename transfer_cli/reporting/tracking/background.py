"""The chosen trackers of a training run in a child process. Their start-up costs seconds (importing
mlflow, opening its SQLite store, starting the W&B service) and would come before the first epoch; in a
child it runs beside the training, which hands over each epoch's numbers and goes on. The run waits for the
child only at its end. What the child cannot do is a warning the run prints, never a lost run."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from transfer_cli.reporting.tracking.base import Trackers, chosen
from transfer_cli.reporting.tracking.preflight import check_trackers
from transfer_cli.reporting.tracking.record import RunRecord


def open_trackers(settings: Mapping[str, Any], output_dir: str) -> Trackers:
    """The trackers of a ``tracker`` config node, for one training run or a sweep's parent run: checked
    here (a missing library, a store that cannot be opened: a UserError before anything trains), then
    built in a child process where the platform forks safely (Linux), else in this one. The command's own
    process then never holds a tracker library's state (a database connection, W&B's service), which its
    later children would inherit."""
    names = chosen(settings)
    if not names:
        return Trackers([])
    check_trackers(settings, names, output_dir)
    if not sys.platform.startswith("linux"):
        return Trackers.chosen_in(settings, output_dir)
    return TrackerProcess(settings, output_dir, names)


class TrackerProcess(Trackers):
    """`Trackers` whose calls go to a forked child that holds the real ones."""

    def __init__(self, settings: Mapping[str, Any], output_dir: str, names: list[str]) -> None:
        super().__init__([], bool(settings.get("log_model")))
        self.names = names
        context = multiprocessing.get_context("fork")
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_end, self.connection, dict(settings), output_dir),
                                       daemon=True, name="transfer-trackers")
        self.process.start()
        child_end.close()

    def __bool__(self) -> bool:
        return bool(self.names)

    def start(self, record: RunRecord, resumed_after: int) -> None:
        self._send("start", record, resumed_after)

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        self._send("log_epoch", step, dict(metrics))
        while self.connection.poll():  # warnings the child had by now
            self._said(self.connection.recv())

    def finish(self, status: str, final: Mapping[str, float], notes: Mapping[str, str], files: list[Path]) -> None:
        """Hand over the end of the run and wait until the child has logged everything."""
        if self.connection.closed:  # finished already (a failure after the end was logged)
            return
        self._send("finish", status, dict(final), dict(notes), files)
        self._wait()

    def _wait(self) -> None:
        try:
            while self._said(self.connection.recv()):
                pass
        except EOFError:
            self.warn(f"the tracker process ({', '.join(self.names)}) ended before it had logged everything; the "
                      "run's own files are complete: `transfer report RUN tracker=...` logs them later.")
        self.connection.close()
        self.process.join()

    def start_sweep(self, sweep_dir: Path, name: str, params: Mapping[str, Any]) -> None:
        self._send("start_sweep", sweep_dir, name, dict(params))

    def finish_sweep(self, sweep_dir: Path, status: str, files: list[Path]) -> None:
        self._send("finish_sweep", sweep_dir, status, files)

    def close(self) -> None:
        """Wait until the child has done what it was sent, and let it go."""
        if not self.connection.closed:
            self._send("close")
            self._wait()

    def discard(self) -> None:
        self.connection.close()  # the child reads the end of its input and leaves
        self.process.join()

    def _send(self, method: str, *args: Any) -> None:
        if not self.connection.closed:
            with contextlib.suppress(OSError):  # the child is gone: finish says so
                self.connection.send((method, args))

    def _said(self, message: tuple[str, str]) -> bool:
        """Print a warning from the child; False once it is done."""
        kind, text = message
        if kind == "warning":
            self.warn(text)
        return kind != "done"


def _serve(connection: Connection, run_end: Connection, settings: dict[str, Any], output_dir: str) -> None:
    """The child: build the trackers (import their libraries, open their stores) while the run imports its
    own and builds, start them with the run's record, then log what the run sends until it finishes."""
    run_end.close()  # the fork's copy of the run's end: open here, the run's closing it would never read as EOF
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the run, which ends the trackers as KILLED
    os.nice(10)  # the training's threads come first: logging takes the time they leave

    def warn(text: str) -> None:
        connection.send(("warning", text))

    trackers = Trackers.chosen_in(settings, output_dir, warn=warn, strict=False)
    while True:
        try:
            method, args = connection.recv()
        except EOFError:  # no run (it had nothing to train), or a killed one: its tracker runs stay open, and a
            return  # resume continues them
        if method != "close":
            getattr(trackers, method)(*args)
        if method in ("finish", "close"):
            connection.send(("done", ""))
            return
