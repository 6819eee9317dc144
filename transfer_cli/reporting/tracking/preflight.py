"""What can be checked about the chosen trackers without importing their libraries (which takes seconds):
that each library is installed, and that MLflow's store can be opened. A run refuses to start when these
fail; what only the library itself can find out (a server that does not answer) is a warning mid-run."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Mapping
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from transfer_cli.reporting.tracking.base import could_not_start, missing_library

LIBRARIES = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the package it needs
# the tracking-store schemes MLflow itself serves (database URIs may name a driver: postgresql+psycopg2)
MLFLOW_SCHEMES = {"", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc",
                  "uc"}


def mlflow_uri(tracking_uri: str | None, output_dir: str) -> str:
    """The store a run logs to: the configured URI, or one SQLite database under the output folder."""
    return tracking_uri or f"sqlite:///{Path(output_dir, 'mlflow.db').resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def check_trackers(settings: Mapping[str, Any], names: list[str], output_dir: str) -> None:
    """Raise the UserError a run should stop with before anything trains."""
    for name in names:
        if not _installed(LIBRARIES[name]):
            raise missing_library(name, LIBRARIES[name])
    if "mlflow" in names:
        uri = mlflow_uri(settings["mlflow"].get("tracking_uri"), output_dir)
        try:
            _check_mlflow_store(uri)
        except Exception as err:
            raise could_not_start("mlflow", err) from None


def _installed(package: str) -> bool:
    try:
        return find_spec(package) is not None
    except (ImportError, ValueError):  # a module set to None (blocked) or without a spec
        return False


def _check_mlflow_store(uri: str) -> None:
    scheme = urlparse(uri).scheme.split("+")[0]
    plugins = {entry.name for entry in entry_points(group="mlflow.tracking_store")}
    if scheme not in MLFLOW_SCHEMES | plugins and len(scheme) != 1:  # one letter: a Windows drive
        raise ValueError(f"no tracking store serves the scheme {scheme!r} of {uri!r} (MLflow serves "
                         f"{', '.join(sorted(s for s in MLFLOW_SCHEMES | plugins if s))}, or a local path)")
    path = sqlite_path(uri)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # MLflow creates it; a refused command leaves none behind
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(f"cannot create {path}: its folder is not writable")
        return
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:  # not a database, or locked: fails here
        db.execute("PRAGMA schema_version").fetchone()
        db.execute("BEGIN IMMEDIATE")
        db.rollback()
