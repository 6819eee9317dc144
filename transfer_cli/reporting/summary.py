"""summary.json + summary.md: what a run achieved, with what, on what."""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

import pandas as pd
import torch
import torchvision

from transfer_cli import __version__
from transfer_cli.files import atomic_write_text
from transfer_cli.reporting.tables import markdown_table
from transfer_cli.run_folder import RunFolder


def versions() -> dict[str, str]:
    return {"transfer_cli": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__}


def command_line() -> str:
    """The command as typed; the CLI puts ``transfer <command>`` in argv[0]."""
    return " ".join(sys.argv)


def write_summary(folder: RunFolder, summary: dict[str, Any], tables: dict[str, pd.DataFrame]) -> None:
    atomic_write_text(folder.summary, json.dumps(summary, indent=2, default=str) + "\n")
    lines = [f"# {summary.get('name', 'run')}", "", f"`{summary.get('command', '')}`", ""]
    for title, df in tables.items():
        lines += [f"## {title}", "", markdown_table(df), ""]
    atomic_write_text(folder.summary_md, "\n".join(lines))


def summary_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The one mapping from a run's summary.json to a table row (run tables, sweep tables, reports)."""
    best = summary.get("best") or {}
    at_best = summary.get("at_best") or {}
    on_val = best.get("split") == "val"
    target = at_best.get("target_test") or summary.get("target_test")  # older summaries: the last epoch
    row = {
        "dataset": summary.get("dataset"),
        "backbone": summary.get("backbone"),
        "method": summary.get("method"),
        "status": summary.get("status", "ok"),
        "epochs": summary.get("epochs"),
        "best_epoch": best.get("epoch"),
        "val_acc1": (at_best.get("val") or {}).get("acc1", best.get("value") if on_val else None),
        "final_val_acc1": (summary.get("final") or {}).get("val", {}).get("acc1"),
        "test_acc1": (summary.get("test") or {}).get("acc1"),
        "test_loss": (summary.get("test") or {}).get("loss"),
        **({"target": f"{summary['dataset']}->{summary['target']}", "select": summary.get("select", "val_acc1"),
            "target_test_acc1": target["acc1"],
            "final_target_test_acc1": (summary.get("final") or {}).get("target_test", {}).get("acc1"),
            **{f"pick_{p['validator'].split()[0]}": p["target_test_acc1"] for p in summary.get("selection") or []}}
           if target else {}),
        "trainable": summary.get("params_trainable"),
        "params": summary.get("params_total"),
        "seconds": round(summary["wall_time_s"], 2) if "wall_time_s" in summary else None,
    }
    if summary.get("error"):
        row["error"] = summary["error"]
    return row


def summary_frame(summary: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([summary_row(summary)])
