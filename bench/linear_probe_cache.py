"""A 20-epoch linear probe: head trained on cached features vs features recomputed every epoch.

    python bench/linear_probe_cache.py [--backbone resnet18] [--epochs 20] [--out outputs/bench]

"recompute" is the same frozen backbone (BatchNorm frozen too) and the same head and optimizer,
run as `method=finetune method.freeze=all method.bn=frozen`, which sends every batch through the
backbone each epoch. "cached (cold)" computes the features once and stores them; "cached (warm)"
is a second run that finds them on disk. Times are the runs' own wall time (summary.json),
which excludes interpreter start-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from transfer_cli.reporting.tables import write_table


def run(args: list[str], folder: Path) -> dict:
    command = [sys.executable, "-m", "transfer_cli", "train", *args, "trainer.progress=none", "trainer.plots=false",
               f"hydra.run.dir={folder}", f"output_dir={folder.parent}"]
    subprocess.run(command, check=True, capture_output=True)
    return json.loads((folder / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args()
    common = ["dataset=digits", f"backbone={args.backbone}", f"trainer.epochs={args.epochs}", "optimizer=adamw"]
    variants = {
        "recompute every epoch": ["method=finetune", "method.freeze=all", "method.bn=frozen"],
        "cached (cold)": ["method=linear_probe", "method.solver=sgd"],
        "cached (warm)": ["method=linear_probe", "method.solver=sgd"],
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, extra) in enumerate(variants.items()):
            summary = run(common + extra, Path(tmp) / f"run{index}")
            rows.append({"variant": name, "backbone": args.backbone, "epochs": args.epochs,
                         "wall_s": round(summary["wall_time_s"], 2), "test_acc1": round(summary["test"]["acc1"], 2)})
    df = pd.DataFrame(rows)
    df["speedup_vs_recompute"] = (df["wall_s"].iloc[0] / df["wall_s"]).round(1)
    write_table(df, args.out / "linear_probe_cache.csv")  # + linear_probe_cache.md
    print(df.to_markdown(index=False))


if __name__ == "__main__":
    main()
