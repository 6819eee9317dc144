"""Wall time of a 4-job sweep: Hydra's sequential launcher vs the joblib launcher with 2 workers.

    python bench/sweep_parallel.py [--epochs 60] [--out outputs/bench]

Each job trains small_cnn on the bundled digits data. Writes sweep_parallel.csv/.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from transfer_cli.reporting.tables import write_table

LAUNCHERS = {
    "sequential (basic)": [],
    "joblib, n_jobs=2": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
}


def time_sweep(extra: list[str], epochs: int, folder: Path) -> float:
    command = [sys.executable, "-m", "transfer_cli", "sweep", "seed=0,1,2,3", f"trainer.epochs={epochs}",
               "trainer.progress=none", "trainer.plots=false", f"hydra.sweep.dir={folder}", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, extra) in enumerate(LAUNCHERS.items()):
            seconds = time_sweep(extra, args.epochs, Path(tmp) / f"sweep{index}")
            rows.append({"launcher": name, "jobs": 4, "epochs_per_job": args.epochs, "wall_s": round(seconds, 1)})
    df = pd.DataFrame(rows)
    df["ratio_to_sequential"] = (df["wall_s"] / df["wall_s"].iloc[0]).round(3)
    write_table(df, args.out / "sweep_parallel.csv")  # + sweep_parallel.md
    print(df.to_markdown(index=False))


if __name__ == "__main__":
    main()
