"""The tracker contract, the registry of trackers, and `Trackers`: the chosen ones behind one object.

A tracker that cannot start is a clear error before anything trains; one that breaks mid-run is a warning
and is dropped, never a lost run: the CSV tables and summary.json stay the source of truth.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from transfer_cli.errors import UserError
from transfer_cli.registry import Registry
from transfer_cli.reporting.tracking.record import RunRecord, final_metrics, run_files
from transfer_cli.run_folder import RunFolder, RunSummary

TRACKERS = Registry("tracker")  # name -> builder of a Tracker; each builder imports its library when called
EXTRA = "pip install 'transfer-cli[track]'"


class Tracker:
    """One experiment tracker. ``start`` opens the run, or reopens it when ``resumed_after`` epochs were
    trained by an earlier start that was stopped (0: a fresh run); ``log_epoch`` gets
    every column of metrics.csv for one epoch; ``finish`` the final numbers, text notes, the run's files and
    its status (``FINISHED`` or ``FAILED``). Sweeps: a parent opened when the sweep starts, closed when it
    ends (trackers without parent runs keep the no-ops)."""

    name = "tracker"

    def start(self, record: RunRecord, resumed_after: int) -> None:
        raise NotImplementedError

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def finish(self, status: str, final: Mapping[str, float], notes: Mapping[str, str], files: list[Path]) -> None:
        raise NotImplementedError

    def holds(self, record: RunRecord) -> bool:
        """Whether this store already holds the finished run (a backfill then leaves it as it is)."""
        raise NotImplementedError

    def start_sweep(self, sweep_dir: Path, name: str, params: Mapping[str, Any]) -> None: ...

    def finish_sweep(self, sweep_dir: Path, status: str, files: list[Path]) -> None: ...


def build_tracker(name: str, settings: Mapping[str, Any], **provided: Any) -> Tracker:
    """The tracker ``name`` with its config node's settings; a missing library, or a store it cannot open
    (a bad URI), is a clear error before anything trains."""
    try:
        return TRACKERS.build({"name": name, **settings}, **provided)
    except UserError:
        raise
    except ImportError as err:
        raise missing_library(name, (err.name or name).split(".")[0]) from None
    except Exception as err:
        raise could_not_start(name, err) from err


def missing_library(name: str, package: str) -> UserError:
    return UserError(f"tracker={name} needs the {package} package, which is not installed: {EXTRA} (or leave "
                     f"tracker={name} out).")


def could_not_start(name: str, err: Exception) -> UserError:
    return UserError(f"tracker={name} could not start ({type(err).__name__}: {err}); nothing was trained. Check "
                     f"the tracker.{name} settings, or leave it out.")


def chosen(settings: Mapping[str, Any]) -> list[str]:
    """The trackers a ``tracker`` config node turns on (csv is always written, and is not one)."""
    return [name for name in TRACKERS.names() if settings.get(name) is not None]


class Trackers:
    """The chosen trackers as one: what one of them fails at mid-run is said once (through ``warn``), and
    that one is dropped."""

    def __init__(self, trackers: list[Tracker], log_model: bool = False,
                 warn: Callable[[str], None] | None = None, strict: bool = True) -> None:
        self.trackers = trackers
        self.log_model = log_model
        self.warn = warn or _print_warning
        self.strict = strict  # a tracker that cannot start stops the run (False: it is left out with a warning)

    @classmethod
    def chosen_in(cls, settings: Mapping[str, Any], output_dir: str, warn: Callable[[str], None] | None = None,
                  strict: bool = True) -> Trackers:
        """The trackers of a resolved ``tracker`` node; not ``strict``: those that cannot be built or started
        are left out with a warning."""
        trackers = cls([], bool(settings.get("log_model")), warn, strict)
        for name in chosen(settings):
            try:
                trackers.trackers.append(build_tracker(name, settings[name], output_dir=output_dir))
            except UserError as err:
                if strict:
                    raise
                trackers.warn(f"{err} It logs nothing for this run; the run's own files are complete: "
                              "`transfer report RUN tracker=...` logs them later.")
        return trackers

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def discard(self) -> None:
        """Let go of trackers that were never started (the run turned out to have nothing to train)."""

    def close(self) -> None:
        """Done with trackers that only opened or closed a sweep (their runs end with ``finish``)."""

    def without_holders(self, record: RunRecord) -> Trackers:
        """Those whose store does not hold ``record`` yet."""
        return Trackers([t for t in self.trackers if not t.holds(record)], self.log_model, self.warn)

    def start(self, record: RunRecord, resumed_after: int) -> None:
        if not self.strict:
            self._each("start", lambda t: t.start(record, resumed_after))
            return
        for tracker in self.trackers:
            try:
                tracker.start(record, resumed_after)
            except Exception as err:
                raise could_not_start(tracker.name, err) from err

    def log_epoch(self, step: int, metrics: Mapping[str, float]) -> None:
        self._each("log epoch metrics", lambda t: t.log_epoch(step, metrics))

    def finish(self, status: str, final: Mapping[str, float], notes: Mapping[str, str], files: list[Path]) -> None:
        self._each("finish the run", lambda t: t.finish(status, final, notes, files))

    @contextlib.contextmanager
    def failures_marked(self, folder: RunFolder) -> Iterator[None]:
        """A run that raises ends FAILED (KILLED when interrupted) in every tracker, with its error."""
        try:
            yield
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            self.finish(status, {}, {"error": f"{type(err).__name__}: {err}"}, run_files(folder, False))
            raise

    def finish_run(self, folder: RunFolder, summary: RunSummary) -> None:
        """The run's final numbers and files, and its status: FINISHED, or FAILED when it diverged."""
        final, notes = final_metrics(summary)
        self.finish("FINISHED" if summary.status == "ok" else "FAILED", final, notes, run_files(folder, self.log_model))

    def start_sweep(self, sweep_dir: Path, name: str, params: Mapping[str, Any]) -> None:
        self._each("open the sweep", lambda t: t.start_sweep(sweep_dir, name, params))

    def finish_sweep(self, sweep_dir: Path, status: str, files: list[Path]) -> None:
        self._each("close the sweep", lambda t: t.finish_sweep(sweep_dir, status, files))

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as err:
                self.trackers.remove(tracker)
                self.warn(f"tracker={tracker.name} could not {what} ({type(err).__name__}: {err}); it logs nothing "
                          "more for this run. The run's own files are complete: `transfer report RUN tracker=...` "
                          "logs them later.")


def _print_warning(text: str) -> None:
    Console(stderr=True).print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)
