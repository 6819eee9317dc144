"""Wall time of a 4-job sweep: Hydra's sequential launcher vs the joblib launcher with 2 workers.

    python bench/sweep_parallel.py [--epochs 60]

Each job trains small_cnn on the bundled digits data. Writes bench/results/sweep_parallel.csv/.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_table import record

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
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, extra) in enumerate(LAUNCHERS.items()):
            seconds = time_sweep(extra, args.epochs, Path(tmp) / f"sweep{index}")
            rows.append({"launcher": name, "jobs": 4, "epochs_per_job": args.epochs, "wall_s": round(seconds, 1)})
    for row in rows:
        row["ratio_to_sequential"] = row["wall_s"] / rows[0]["wall_s"]
    record("sweep_parallel", rows, "4-job sweep wall time (each parallel job gets cores / n_jobs threads)")


if __name__ == "__main__":
    main()
