"""Start-up time of the commands that only read configs, against `python -c "import hydra"` (the floor:
every command composes a Hydra config). Medians of alternating runs in fresh interpreters.

    python bench/startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

from results_table import record

COMMANDS = {
    'python -c "import hydra"': [sys.executable, "-c", "import hydra"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "transfer --help": [sys.executable, "-m", "transfer_cli", "--help"],
    "transfer train --help": [sys.executable, "-m", "transfer_cli", "train", "--help"],
    "transfer train --cfg job": [sys.executable, "-m", "transfer_cli", "train", "--cfg", "job"],
    "transfer eval --help": [sys.executable, "-m", "transfer_cli", "eval", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, command in COMMANDS.items():
                start = time.perf_counter()
                subprocess.run(command, cwd=tmp, check=True, capture_output=True)
                times[name].append(time.perf_counter() - start)
    floor = statistics.median(times['python -c "import hydra"'])
    record("startup", [{"command": name, "seconds": statistics.median(t), "vs_import_hydra": statistics.median(t) / floor}
                       for name, t in times.items()], "start-up (median of alternating runs)")


if __name__ == "__main__":
    main()
