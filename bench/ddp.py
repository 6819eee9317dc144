"""One process against two (DDP, gloo on the CPU) at the same global batch, on a 1,000-image MNIST subset
(../shared) with LeNet-5: test top-1 and wall time, written to bench/results/ddp.md.

    python bench/ddp.py [--shared ../shared]   # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_table import record


def run(args: list[str], folder: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "transfer_cli", "train", *args, f"hydra.run.dir={folder}"], check=True,
                   capture_output=True)
    return json.loads((folder / "summary.json").read_text()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    args = parser.parse_args()
    common = ["dataset=mnist", f"dataset.root={(args.shared / 'datasets' / 'mnist').resolve()}", "dataset.shots=100",
              "dataset.val_fraction=0.02", "backbone=lenet", "method=finetune", "optimizer=sgd", "optimizer.lr=0.05",
              "trainer.epochs=20", "trainer.progress=none", "trainer.plots=false", "trainer.deterministic=true"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes, batch in ((1, 32), (2, 16)):
            summary, wall = run([*common, f"dataset.batch_size={batch}", f"trainer.devices={processes}"],
                                Path(tmp) / str(processes))
            rows.append({"processes": processes, "batch per process": batch, "global batch": summary["global_batch"],
                         "test top-1": round(summary["test"]["acc1"], 2),
                         "train samples/s (last epoch)": round(summary["final"]["train"]["samples_per_s"]),
                         "wall s (incl. start-up)": round(wall, 1)})
    record("ddp", rows, "MNIST 1,000 images, LeNet-5, 20 epochs: 1 vs 2 processes (CPU, gloo)")


if __name__ == "__main__":
    main()
