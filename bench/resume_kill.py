"""Kill runs with SIGKILL at several points, resume them, and count how many end bit-identical to a run
that was never stopped (final weights, and metrics.csv without its wall-clock columns).

    python bench/resume_kill.py [--delays 0.2 1 2 4] [--out outputs/bench]

Each kill lands ``delay`` seconds after the run saved its first resumable state. Writes resume_kill.csv/.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from transfer_cli.reporting.tables import write_table

COMMON = ["trainer.epochs=6", "trainer.save_every_s=0", "trainer.deterministic=true", "trainer.threads=1",
          "trainer.progress=none", "trainer.plots=false", "dataset.image_size=16", "dataset.batch_size=16"]
# also used by tests/test_resume.py; digits stand in as dann's own unlabelled target
METHODS = {
    "finetune": ["method=finetune", "method.freeze=1"],
    "gradual_unfreeze": ["method=gradual_unfreeze"],
    "lora_ema": ["method=lora", "trainer.ema_decay=0.9"],  # adapters and the running average resume too
    "finetune_swa": ["method=finetune", "trainer.swa_start=2"],
    "dann": ["method=dann", "target=usps", "target.dataset.name=digits", "target.dataset.root=null",
             "target.dataset.batch_size=16"],
    # the source-free phase switch and the centroids of SHOT; CDAN's conditioning with MCC
    "shot": ["method=shot", "method.source_epochs=2", "target=usps", "target.dataset.name=digits",
             "target.dataset.root=null", "target.dataset.batch_size=16"],
    "cdan_e_mcc": ["method=cdan_e_mcc", "target=usps", "target.dataset.name=digits", "target.dataset.root=null",
                   "target.dataset.batch_size=16"],
}


def train(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "transfer_cli", "train", *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def final(run: Path) -> tuple[dict, pd.DataFrame]:
    return (load_file(str(run / "checkpoints" / "last.safetensors")),
            pd.read_csv(run / "metrics.csv").drop(columns=["seconds", "samples_per_s"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delays", type=float, nargs="+", default=[0.2, 1.0, 2.0, 4.0])
    parser.add_argument("--out", default="outputs/bench")
    opts = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for method, extra in METHODS.items():
            args = [*COMMON, *extra]
            assert train([*args, f"hydra.run.dir={method}_ref"], root).wait() == 0
            ref_weights, ref_metrics = final(root / f"{method}_ref")
            for delay in opts.delays:
                run = root / f"{method}_{delay}"
                proc = train([*args, f"hydra.run.dir={run.name}"], root)
                while not (run / "checkpoints" / "train_state.pt").exists() and proc.poll() is None:
                    time.sleep(0.02)
                time.sleep(delay)
                finished_before_kill = proc.poll() is not None
                os.kill(proc.pid, signal.SIGKILL) if not finished_before_kill else None
                proc.wait()
                epochs_done = int(pd.read_csv(run / "metrics.csv")["epoch"].max())
                assert train([*args, f"hydra.run.dir={run.name}_new", f"trainer.resume={run.name}"], root).wait() == 0
                weights, metrics = final(run)
                identical = (all(torch.equal(ref_weights[k], weights[k]) for k in ref_weights)
                             and metrics.equals(ref_metrics))
                rows.append({"method": method, "kill_after_s": delay, "epochs_done_at_kill": epochs_done,
                             "killed_mid_run": not finished_before_kill, "bit_identical": identical})
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    write_table(table, Path(opts.out) / "resume_kill.csv")
    print(table.to_markdown(index=False))


if __name__ == "__main__":
    main()
