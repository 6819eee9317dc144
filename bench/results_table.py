"""Where every benchmark writes: bench/results/<name>.csv and .md, each row stamped with the date, the torch
version and the machine's cores, and the table printed with rich."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console

from transfer_cli.reporting.tables import rich_table, write_table

RESULTS = Path(__file__).resolve().parent / "results"


def record(name: str, rows: list[dict], title: str) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    stamp = {"date": dt.date.today().isoformat(), "torch": torch.__version__, "cores": os.cpu_count(),
             "cpu": platform.processor() or platform.machine(),
             "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}
    for column, value in reversed(stamp.items()):
        table.insert(0, column, value)
    write_table(table, RESULTS / f"{name}.csv", markdown=True)
    Console().print(rich_table(table.drop(columns=list(stamp)), title=f"{title}  ->  bench/results/{name}.csv"))
    return table
