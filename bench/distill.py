"""Knowledge distillation on real data (needs ../shared): a small CNN (16 px) on USPS with 20 labels per class,
trained from the labels only, or distilled from the fine-tuned ImageNet MobileNetV2 (96 px) or from an ensemble
of three small CNNs trained on the same 20-shot draw, on the labelled images alone or also on the train images
the draw left unlabelled (method.unlabelled=true); 3 seeds (draws) each, with every model's parameters, ONNX
file size and CPU latency (batch 1 and 32).

    python bench/distill.py [--shared ../shared] [--out outputs/bench/distill] [--teacher CHECKPOINT]

Without --teacher the teacher is trained first (seed 0, default fine-tune, about 5 minutes on 2 cores).
Writes bench/results/distill.csv/.md. Runs already finished in --out are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from results_table import record

QUIET = ["trainer.progress=none", "trainer.plots=false"]
SEEDS = [0, 1, 2]


def transfer(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "transfer_cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"transfer {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def train(folder: Path, overrides: list[str]) -> dict:
    if not (folder / "summary.json").is_file():
        transfer("train", *overrides, *QUIET, f"hydra.run.dir={folder}")
    return json.loads((folder / "summary.json").read_text())


def exported(folder: Path, checkpoint: Path) -> pd.Series:
    """The ONNX row of `transfer export` (file size, latency) for ``checkpoint``."""
    if not (folder / "export.csv").is_file():
        transfer("export", f"checkpoint={checkpoint}", "samples=256", "repeats=20", f"hydra.run.dir={folder}")
    return pd.read_csv(folder / "export.csv").iloc[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "outputs" / "bench" / "distill")
    parser.add_argument("--teacher", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=60, help="of every student (and small-CNN teacher)")
    args = parser.parse_args()
    out, shared = args.out.resolve(), args.shared.resolve()
    usps = ["dataset=usps", f"dataset.root={shared / 'datasets' / 'usps'}", "dataset.shots=20"]
    teacher = args.teacher
    if teacher is None:
        weights = shared / "weights" / "imagenet_mobilenet_v2" / "mobilenet_v2_imagenet1k_dequantized_fp32.safetensors"
        train(out / "teacher", [*usps, "trainer.epochs=15", "dataset.image_size=96", "backbone=mobilenet_v2",
                                f"backbone.weights={weights}", "method=finetune", "seed=0"])
        teacher = out / "teacher" / "checkpoints" / "best.safetensors"
    teacher_summary = json.loads((teacher.parent.parent / "summary.json").read_text())
    rows = [{"model": "teacher: MobileNetV2 (ImageNet) fine-tuned, 96 px", "test_acc1": f"{teacher_summary['test']['acc1']:.1f}",
             "seeds": 1, **_deployment(exported(out / "export_teacher", teacher), teacher_summary)}]
    student = [*usps, "backbone=small_cnn", f"trainer.epochs={args.epochs}"]

    def ensemble(seed: int) -> list[Path]:
        """Three small CNNs trained on the student's own 20-shot draw (other initialisations)."""
        return [Path(train(out / f"member_{seed}_{m}", [*student, "method=finetune", f"seed={10 + m}",
                                                         f"dataset.shots_seed={seed}"])["run_dir"])
                / "checkpoints" / "best.safetensors" for m in range(3)]

    def teachers(kind: str, seed: int) -> str:
        return str(teacher) if kind == "mobilenet" else f"[{','.join(map(str, ensemble(seed)))}]"

    settings = [("student: small CNN, labels only", "finetune", None, False)]
    for kind, name in (("mobilenet", "the MobileNetV2"), ("ensemble", "3 small CNNs (same draw)")):
        settings += [(f"student distilled from {name}", f"kd_{kind}", kind, False),
                     (f"student distilled from {name} + unlabelled train images", f"kdu_{kind}", kind, True)]
    for label, tag, kind, unlabelled in settings:
        extra = ["method=finetune"] if kind is None else [
            "method=distill", f"method.unlabelled={str(unlabelled).lower()}"]
        runs = [train(out / f"{tag}_{seed}", [*student, *extra, f"seed={seed}",
                                              *([f"method.teacher={teachers(kind, seed)}"] if kind else [])])
                for seed in SEEDS]
        rows.append(_row(label, runs, out / f"export_{tag}"))
    members = [[json.loads((p.parent.parent / "summary.json").read_text()) for p in ensemble(seed)] for seed in SEEDS]
    acc = np.array([ensemble_accuracy(out / f"ensemble_{seed}", ensemble(seed)) for seed in SEEDS])
    rows.append({"model": "teacher: ensemble of 3 small CNNs (mean probabilities)",
                 "test_acc1": f"{acc.mean():.1f} ± {acc.std(ddof=1):.1f}", "seeds": len(acc),
                 "params": 3 * members[0][0]["params_total"], "train_s": round(sum(m["wall_time_s"] for m in members[0]))})
    record("distill", rows, f"distillation: USPS 20 labels per class, {args.epochs} epochs, test top-1 and deployment cost")


def ensemble_accuracy(folder: Path, checkpoints: list[Path]) -> float:
    if not (folder / "eval.csv").is_file():
        transfer("eval", f"checkpoint=[{','.join(map(str, checkpoints))}]", f"hydra.run.dir={folder}")
    table = pd.read_csv(folder / "eval.csv")
    return float(table[table["model"].str.startswith("ensemble")]["acc1"].iloc[0])


def _row(label: str, runs: list[dict], export_dir: Path) -> dict:
    acc = np.array([r["test"]["acc1"] for r in runs])
    checkpoint = Path(runs[0]["run_dir"]) / "checkpoints" / "best.safetensors"
    return {"model": label, "test_acc1": f"{acc.mean():.1f} ± {acc.std(ddof=1):.1f}", "seeds": len(acc),
            **_deployment(exported(export_dir, checkpoint), runs[0])}


def _deployment(onnx_row: pd.Series, summary: dict) -> dict:
    return {"params": summary["params_total"], "onnx_mb": onnx_row["file_mb"],
            "ms_per_image_b1": onnx_row["ms_per_image_b1"], "ms_per_image_b32": onnx_row["ms_per_image_b32"],
            "train_s": round(summary["wall_time_s"])}


if __name__ == "__main__":
    main()
