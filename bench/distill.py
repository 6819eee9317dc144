"""Knowledge distillation on real data (needs ../shared): the fine-tuned ImageNet MobileNetV2 on USPS 20-shot
(96 px) teaches a small CNN (16 px); the student trained from labels only against the distilled student,
3 seeds each, with every model's parameters, ONNX file size and CPU latency (batch 1 and 32).

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
    args = parser.parse_args()
    out, shared = args.out.resolve(), args.shared.resolve()
    usps = ["dataset=usps", f"dataset.root={shared / 'datasets' / 'usps'}", "dataset.shots=20", "trainer.epochs=15"]
    teacher = args.teacher
    if teacher is None:
        weights = shared / "weights" / "imagenet_mobilenet_v2" / "mobilenet_v2_imagenet1k_dequantized_fp32.safetensors"
        train(out / "teacher", [*usps, "dataset.image_size=96", "backbone=mobilenet_v2", f"backbone.weights={weights}",
                                "method=finetune", "seed=0"])
        teacher = out / "teacher" / "checkpoints" / "best.safetensors"
    teacher_summary = json.loads((teacher.parent.parent / "summary.json").read_text())
    rows = [{"model": "teacher: MobileNetV2 (ImageNet) fine-tuned, 96 px", "test_acc1": f"{teacher_summary['test']['acc1']:.1f}",
             "seeds": 1, **_deployment(exported(out / "export_teacher", teacher), teacher_summary)}]
    for label, extra in (("student: small CNN, labels only", ["method=finetune"]),
                         ("student: small CNN, distilled (T=4, alpha=0.9)", ["method=distill", f"method.teacher={teacher}"])):
        tag = extra[0].split("=")[1]
        runs = [train(out / f"{tag}_{seed}", [*usps, "backbone=small_cnn", *extra, f"seed={seed}"]) for seed in SEEDS]
        acc = np.array([r["test"]["acc1"] for r in runs])
        checkpoint = Path(runs[0]["run_dir"]) / "checkpoints" / "best.safetensors"
        rows.append({"model": label, "test_acc1": f"{acc.mean():.1f} ± {acc.std(ddof=1):.1f}", "seeds": len(acc),
                     **_deployment(exported(out / f"export_{tag}", checkpoint), runs[0])})
    record("distill", rows, "distillation: USPS 20 labels per class, test top-1 and deployment cost")


def _deployment(onnx_row: pd.Series, summary: dict) -> dict:
    return {"params": summary["params_total"], "onnx_mb": onnx_row["file_mb"],
            "ms_per_image_b1": onnx_row["ms_per_image_b1"], "ms_per_image_b32": onnx_row["ms_per_image_b32"],
            "train_s": round(summary["wall_time_s"])}


if __name__ == "__main__":
    main()
