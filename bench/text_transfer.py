"""Text transfer on real data (needs ../shared/datasets/rt_polarity and sms_spam), written to
bench/results/text_<dataset>.md: MiniLM (frozen, L-BFGS logistic regression with l2 chosen on val; the last
layer's mean pool, and the mean pools of all 6 layers side by side) and TF-IDF 1-2-grams (the same probe)
at 16 / 64 / 256 labelled texts per class and on the full train split, seeds 0, 1, 2 (each seed draws its
own few-shot set; the test split is the same stratified 20 % for all), then MiniLM fine-tuned end to end
for 2 epochs (AdamW, lr 2e-5, batch 32, max length 64) on the whole 80 % (no validation split: the last
epoch is tested), plainly (seeds 0, 1, 2) and as LP-FT (seed 0). bench/text_reference.py runs the plain Hugging
Face recipe on the same split, to compare the fine-tune row with.

    python bench/text_transfer.py [--only rt_polarity|sms_spam] [--shared ../shared] [--skip-finetune]

About 1.5 hours on 2 CPU cores (the eight fine-tunes, 4-10 minutes each, are most of it). Sweeps already finished in --out are
reused (delete the folder to measure again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from results_table import record

FAST = ["trainer.progress=none", "trainer.plots=false"]
SEEDS = "0,1,2"
SHOTS = ["16", "64", "256", "null"]
PROBE = ["method=linear_probe", "method.l2=auto", "trainer.epochs=5"]
FINETUNE = ["backbone=minilm", "optimizer=adamw", "optimizer.lr=2e-5", "dataset.batch_size=32", "backbone.max_length=64",
            "trainer.epochs=2", "dataset.val_fraction=0"]
PROBES = (("minilm", "1", "MiniLM frozen + logistic regression (l2=auto)"),
          ("minilm", "6", "MiniLM frozen, all 6 layers' mean pools + logistic regression (l2=auto)"),
          ("tfidf", "1", "TF-IDF 1-2g + logistic regression (l2=auto)"))
TUNED = (("finetune", ["seed=0,1,2"], "MiniLM fine-tuned 2 epochs (lr 2e-5, batch 32, max length 64)"),
         ("lp_ft", ["method.backbone_lr_mult=1", "seed=0"], "MiniLM LP-FT 2 epochs (the same settings)"))


def sweep(out: Path, name: str, overrides: list[str]) -> list[dict]:
    """Job summaries of ``transfer sweep overrides`` in out/name (reused when it finished before)."""
    folder = out / name
    if not (folder / "sweep.csv").is_file():
        subprocess.run([sys.executable, "-m", "transfer_cli", "sweep", *overrides, *FAST,
                        f"hydra.sweep.dir={folder}", f"output_dir={out}"], check=True)
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*/summary.json"))]


def cell(runs: list[dict]) -> str:
    acc = np.array([r["test"]["acc1"] for r in runs]) / 100
    return f"{acc.mean():.3f} ± {acc.std(ddof=1):.3f}" if len(acc) > 1 else f"{acc[0]:.3f}"


def seconds(runs: list[dict]) -> float:
    """Wall time of the fastest seed: the seeds do the same work, so the slowest ones only measure what else
    the machine was doing (timeit reports its minimum for the same reason)."""
    return round(float(min(r["wall_time_s"] for r in runs)), 1)


def bench(dataset: str, root: Path, out: Path, finetune: bool) -> None:
    common = [f"dataset={dataset}", f"dataset.root={root}"]
    shots = [*PROBE, f"dataset.shots={','.join(SHOTS)}", f"seed={SEEDS}"]
    probes = sweep(out, f"{dataset}_probe", [*common, *shots, "backbone=minilm,tfidf"])
    probes += sweep(out, f"{dataset}_probe_layers", [*common, *shots, "backbone=minilm", "backbone.pool_layers=6"])
    drawn = {int(s) * 2 for s in SHOTS if s != "null"}  # train texts of a few-shot run (2 classes)
    rows = []
    for backbone, layers, label in PROBES:
        row = {"method": label}
        for shot in SHOTS:
            runs = [r for r in probes if r["backbone"] == backbone and str(r["input"].get("pool_layers", 1)) == layers
                    and (r["samples"]["train"] == 2 * int(shot) if shot != "null" else r["samples"]["train"] not in drawn)]
            row["full 80/20" if shot == "null" else f"{shot}/class"] = cell(runs)
            row[f"s/run ({'full' if shot == 'null' else shot})"] = seconds(runs)
        rows.append(row)
    for method, extra, label in TUNED if finetune else ():
        tuned = sweep(out, f"{dataset}_{method}", [*common, *FINETUNE, f"method={method}", *extra])
        rows.append({"method": label, "full 80/20": cell(tuned), "s/run (full)": seconds(tuned)})
    record(f"text_{dataset}", rows, f"{dataset}: test top-1 (mean ± std over seeds 0-2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["rt_polarity", "sms_spam"])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/text"))
    parser.add_argument("--skip-finetune", action="store_true")
    args = parser.parse_args()
    for dataset in ("rt_polarity", "sms_spam"):
        if args.only in (None, dataset):
            bench(dataset, (args.shared / "datasets" / dataset).resolve(), args.out.resolve(), not args.skip_finetune)


if __name__ == "__main__":
    main()
