"""What experiment trackers cost: a 30-epoch digits run (small_cnn, the default fine-tune) with the CSV files
only against the same run with each tracker and with tracker=[mlflow,tensorboard,wandb] (W&B offline),
alternated, each measured as
the whole command (interpreter start, tracker start-up, logging, closing) and as the run's own wall time.

    python bench/trackers.py [--repeats 3] [--epochs 30] [--out outputs/bench/trackers]

Writes bench/results/trackers_<epochs>ep.csv/.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_table import record

SETTINGS = {"csv only": [], "tensorboard": ["tracker=tensorboard"], "mlflow": ["tracker=mlflow"],
            "wandb (offline)": ["tracker=wandb"], "mlflow + tensorboard + wandb": ["tracker=[mlflow,tensorboard,wandb]"]}


def run(folder: Path, epochs: int, extra: list[str], output_dir: Path) -> tuple[float, float]:
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "transfer_cli", "train", "dataset=digits", f"trainer.epochs={epochs}",
                           "trainer.progress=none", f"output_dir={output_dir}", f"hydra.run.dir={folder}", *extra],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return seconds, json.loads((folder / "summary.json").read_text())["wall_time_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/trackers"))
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in SETTINGS}
    for repeat in range(args.repeats):  # alternated, so a slow spell of the machine hits both
        for setting, (name, extra) in enumerate(SETTINGS.items()):
            times[name].append(run(args.out / f"{repeat}_{setting}", args.epochs, extra, args.out))
            print(f"repeat {repeat}: {name}: {times[name][-1][0]:.1f} s", flush=True)
    base_command = statistics.median(t for t, _ in times["csv only"])
    base_run = statistics.median(r for _, r in times["csv only"])
    rows = []
    for name, measured in times.items():
        command, inside = statistics.median(t for t, _ in measured), statistics.median(r for _, r in measured)
        rows.append({"trackers": name, "epochs": args.epochs, "repeats": args.repeats,
                     "command_s": round(command, 2), "run_s": round(inside, 2),
                     "command_overhead_pct": round(100 * (command / base_command - 1), 1),
                     "run_overhead_pct": round(100 * (inside / base_run - 1), 1)})
    record(f"trackers_{args.epochs}ep", rows, f"tracker overhead, {args.epochs}-epoch digits run (median of {args.repeats})")


if __name__ == "__main__":
    main()
