"""Tables written as CSV + Markdown (pandas) and shown with rich."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from rich.table import Table

from transfer_cli.files import atomic_write, atomic_write_text

METRIC_COLUMNS = ["epoch", "split", "loss", "acc1", "acc5", "lr", "seconds", "samples_per_s"]


def write_table(df: pd.DataFrame, path: Path, markdown: bool = True) -> None:
    """``path`` is the CSV; a Markdown twin goes next to it when ``markdown`` is set."""
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))
    if markdown:
        atomic_write_text(path.with_suffix(".md"), markdown_table(df) + "\n")


def markdown_table(df: pd.DataFrame) -> str:
    cells = df.astype(object).where(df.notna(), None)  # gaps (val rows have no lr) print as blanks
    return cells.to_markdown(index=False, floatfmt=".4g", missingval="")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def rich_record(record: dict[str, object], title: str | None = None) -> Table:
    """One row shown as key/value lines: fits a narrow terminal or a CI log."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in record.items():
        table.add_row(key, _cell(value))
    return table


def rich_table(df: pd.DataFrame, title: str | None = None, highlight: Sequence[int] = ()) -> Table:
    table = Table(title=title, header_style="bold")
    for column in df.columns:
        table.add_column(str(column), justify="right" if pd.api.types.is_numeric_dtype(df[column]) else "left")
    for i, row in enumerate(df.itertuples(index=False)):
        table.add_row(*(_cell(v) for v in row), style="bold green" if i in highlight else None)
    return table


def metrics_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(history)
    known = [c for c in METRIC_COLUMNS if c in df.columns]
    return df[known + sorted(c for c in df.columns if c not in METRIC_COLUMNS)]
