"""summary.json + summary.md: what a run achieved, with what, on what."""

from __future__ import annotations

import platform
import sys
from typing import Any

import pandas as pd

from transfer_cli import __version__
from transfer_cli.files import atomic_write_text
from transfer_cli.reporting.tables import markdown_table
from transfer_cli.run_folder import RunFolder, RunSummary


def versions() -> dict[str, str]:
    import torch  # here: the trackers' child process reads summaries without torch
    import torchvision

    return {"transfer_cli": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__}


def command_line() -> str:
    """The command as typed; the CLI puts ``transfer <command>`` in argv[0]."""
    return " ".join(sys.argv)


def write_summary_md(folder: RunFolder, summary: RunSummary, tables: dict[str, pd.DataFrame]) -> None:
    """summary.md: the run's command and ``tables``, for reading (summary.json is the record)."""
    lines = [f"# {summary.name or 'run'}", "", f"`{summary.command or ''}`", ""]
    for title, df in tables.items():
        lines += [f"## {title}", "", markdown_table(df), ""]
    atomic_write_text(folder.summary_md, "\n".join(lines))


def summary_row(summary: RunSummary) -> dict[str, Any]:
    """The one mapping from a run's summary to a table row (run tables, sweep tables, reports)."""
    best = summary.best or {}
    at_best = summary.at_best or {}
    final = summary.final or {}
    test = summary.test or {}
    on_val = best.get("split") == "val"
    target = at_best.get("target_test") or summary.target_test  # older summaries: the last epoch
    row = {
        "dataset": summary.dataset,
        "backbone": summary.backbone,
        "method": summary.method,
        "status": summary.status,
        "epochs": summary.epochs,
        "best_epoch": best.get("epoch"),
        "val_acc1": (at_best.get("val") or {}).get("acc1", best.get("value") if on_val else None),
        "final_val_acc1": final.get("val", {}).get("acc1"),
        "test_acc1": test.get("acc1"),
        "test_loss": test.get("loss"),
        **({"target": f"{summary.dataset}->{summary.target}", "select": summary.select or "val_acc1",
            "target_test_acc1": target["acc1"],
            "final_target_test_acc1": final.get("target_test", {}).get("acc1"),
            **{f"pick_{p['validator'].split()[0]}": p["target_test_acc1"] for p in summary.selection or []}}
           if target else {}),
        "trainable": summary.facts.get("params_trainable"),
        "params": summary.facts.get("params_total"),
        "seconds": round(summary.wall_time_s, 2) if summary.wall_time_s is not None else None,
    }
    if summary.error:
        row["error"] = summary.error
    return row


def summary_frame(summary: RunSummary) -> pd.DataFrame:
    return pd.DataFrame([summary_row(summary)])
