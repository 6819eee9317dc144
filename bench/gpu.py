"""GPU readiness: ResNet-50 fine-tuning at 224 px on a folder of real photos, `transfer train` against the
minimal loop (bench/loop_ratio.py) under fp32, bf16-mixed, bf16-mixed + channels_last and + torch.compile,
and the two data paths feeding it (decoded once and kept on the GPU, or decoded per sample by workers).

    bash bench/gpu.sh            # installs the project, then runs this (about 5 minutes on one GPU)
    python bench/gpu.py --device cpu --model small_cnn --images 64 --epochs 2   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from data_path import SPEC, throughput
from loop_ratio import compose_cfg, minimal, ours
from photo_folder import make_photo_folder
from results_table import record

from transfer_cli.config import register_schemas
from transfer_cli.data.decoded import hold_in_memory
from transfer_cli.engine.device import resolve_device
from transfer_cli.pipeline import build_data, make_loader

MODES = {
    "fp32": ["trainer.precision=32"],
    "bf16-mixed": ["trainer.precision=bf16-mixed"],
    "bf16-mixed + channels_last": ["trainer.precision=bf16-mixed", "trainer.channels_last=true"],
    "bf16-mixed + channels_last + compile": ["trainer.precision=bf16-mixed", "trainer.channels_last=true",
                                             "trainer.compile=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--images", type=int, default=2048, help="train photos (2 classes)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    register_schemas()
    device = resolve_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = make_photo_folder(Path(tmp) / "photos", {"train": args.images // 2, "val": 8})
        common = ["dataset=imagefolder", f"dataset.root={root}", "dataset.augment=flip_crop", "dataset.val_fraction=0",
                  f"dataset.batch_size={args.batch}", f"backbone={args.model}", "dataset.image_size=224",
                  "method=finetune", f"trainer.device={args.device}", f"trainer.epochs={args.epochs}",
                  "trainer.progress=plain", "trainer.plots=false", f"output_dir={tmp}"]
        for mode in args.modes.split(","):
            cfg = compose_cfg([*common, *MODES[mode]])
            start = time.perf_counter()
            rate = ours(cfg, Path(tmp) / mode.replace(" ", "_"))
            rows.append({"case": f"train {args.model}, {mode}", "ours_img_per_s": rate,
                         "minimal_img_per_s": minimal(cfg, args.epochs), "wall_s": time.perf_counter() - start})
        cfg = compose_cfg([*common, "trainer.precision=bf16-mixed", "dataset.in_memory=false"])
        rows.append({"case": f"train {args.model}, bf16-mixed, per-sample data (num_workers=auto)",
                     "ours_img_per_s": ours(cfg, Path(tmp) / "per_sample"), "minimal_img_per_s": float("nan")})
        for in_memory in ("true", "false"):
            cfg = compose_cfg([*common, f"dataset.in_memory={in_memory}"]).dataset
            splits = hold_in_memory(build_data(cfg), SPEC, cfg, print)
            loader = make_loader(splits.train, SPEC, cfg, True, device)
            rows.append({"case": f"loader only, flip_crop, in_memory={in_memory}",
                         "ours_img_per_s": throughput(loader), "minimal_img_per_s": float("nan")})
    for row in rows:
        row["ratio"] = row["ours_img_per_s"] / row["minimal_img_per_s"]
    record(f"gpu_{device.type}", rows, f"{args.model} 224 px on {torch.cuda.get_device_name() if device.type == 'cuda' else device}")


if __name__ == "__main__":
    main()
