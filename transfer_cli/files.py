"""Writing files so that a kill mid-write never leaves a half-written file in place of a good one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` fills a temporary file in the same folder, which is then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def remove_orphan_tmp(folder: Path) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder`` (recursively); returns what was removed."""
    if not folder.is_dir():
        return []
    orphans = [p for p in folder.rglob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in orphans:
        p.unlink(missing_ok=True)
    return orphans


def discard_if_only_hydra(folder: Path) -> None:
    """Remove a run folder that holds nothing but what Hydra writes at the start (.hydra/, *.log)."""
    if folder.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)
