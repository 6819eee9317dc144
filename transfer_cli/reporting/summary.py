"""summary.json + summary.md: what a run achieved, with what, on what."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torchvision

from transfer_cli import __version__
from transfer_cli.engine.checkpoint import atomic_write_text
from transfer_cli.reporting.tables import markdown_table


def versions() -> dict[str, str]:
    return {"transfer_cli": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__}


def command_line() -> str:
    """The command as typed; the CLI puts ``transfer <command>`` in argv[0]."""
    return " ".join(sys.argv)


def write_summary(folder: Path, summary: dict[str, Any], tables: dict[str, pd.DataFrame]) -> None:
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    lines = [f"# {summary.get('name', 'run')}", "", f"`{summary.get('command', '')}`", ""]
    for title, df in tables.items():
        lines += [f"## {title}", "", markdown_table(df), ""]
    atomic_write_text(folder / "summary.md", "\n".join(lines))


def summary_frame(summary: dict[str, Any]) -> pd.DataFrame:
    val = summary["final"].get("val", {})
    row = {
        "dataset": summary["dataset"],
        "backbone": summary["backbone"],
        "method": summary["method"],
        "epochs": summary["epochs"],
        "best_epoch": summary["best"]["epoch"],
        "val_acc1": summary["best"]["value"],
        "final_val_acc1": val.get("acc1"),
        "test_acc1": summary["test"]["acc1"],
        "test_loss": summary["test"]["loss"],
        **({"target_test_acc1": summary["target_test"]["acc1"]} if summary.get("target_test") else {}),
        "trainable": summary["params_trainable"],
        "params": summary["params_total"],
        "seconds": round(summary["wall_time_s"], 1),
    }
    return pd.DataFrame([row])
