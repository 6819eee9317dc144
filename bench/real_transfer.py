"""Transfer checks on real data and real pretrained weights from ../shared (skipped when absent).

    python bench/real_transfer.py [--shared ../shared] [--out outputs/bench] [--only NAME]

  mobilenet_usps   ImageNet MobileNetV2 (torchvision weights, BN folded) as a frozen feature
                   extractor on USPS: linear probe (L-BFGS) vs the same probe on a random MobileNetV2.
  lenet_mnist_usps LeNet-5 trained on MNIST -> USPS: scratch vs linear probe vs fine-tune, with
                   10 labels per class and with the full USPS training set, 3 seeds.
  cifar_resnet     CIFAR-10 ResNet-20 -> digits: linear probe vs a random ResNet-20.

Each check is one `transfer sweep`; its seed-grouped summary table is copied to OUT/<check>.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path


def checks(shared: Path) -> dict[str, list[str]]:
    usps = shared / "datasets" / "usps"
    mobilenet = shared / "weights" / "imagenet_mobilenet_v2" / "mobilenet_v2_imagenet1k_dequantized_fp32.safetensors"
    lenet = shared / "weights" / "mnist_lenet5" / "lenet5_mnist.pth"
    resnet20 = next((shared / "weights" / "cifar10_resnets").glob("resnet20-*.th"), Path("missing"))
    return {
        # 96 px keeps feature extraction to about a minute on 2 CPU cores (224 px: ~5x longer).
        "mobilenet_usps": ["dataset=usps", f"dataset.root={usps}", "backbone=mobilenet_v2", "method=linear_probe",
                           "method.l2=0.01", f"backbone.weights={mobilenet},none", "dataset.image_size=96", "trainer.epochs=5",
                           "dataset.mean=[0.485,0.456,0.406]", "dataset.std=[0.229,0.224,0.225]"],
        # The LeNet-5 weights expect [0, 1] pixels without normalisation, 32x32.
        "lenet_mnist_usps": ["dataset=usps", f"dataset.root={usps}", "backbone=lenet", f"backbone.weights={lenet}",
                             "dataset.mean=[0]", "dataset.std=[1]", "method=scratch,linear_probe,finetune",
                             "dataset.shots=10,null", "seed=0,1,2", "trainer.epochs=15"],
        "cifar_resnet": ["dataset=digits", "backbone=cifar_resnet20", f"backbone.weights={resnet20},none",
                         "method=linear_probe", "method.l2=0.01", "dataset.image_size=32", "trainer.epochs=5",
                         "dataset.mean=[0.485,0.456,0.406]", "dataset.std=[0.229,0.224,0.225]"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    if not args.shared.is_dir():
        print(f"{args.shared} is absent: these checks need the shared real data and weights; skipped.")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name, overrides in checks(args.shared.resolve()).items():
        if args.only and name != args.only:
            continue
        sweep_dir = args.out / "sweeps" / name
        shutil.rmtree(sweep_dir, ignore_errors=True)
        command = [sys.executable, "-m", "transfer_cli", "sweep", *overrides, "trainer.progress=none",
                   "trainer.plots=false", f"hydra.sweep.dir={sweep_dir}"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        table = (sweep_dir / "summary.md").read_text()
        (args.out / f"{name}.md").write_text(f"`transfer sweep {' '.join(overrides)}`\n\n{table}\nwall time {seconds:.0f} s\n")
        print(f"## {name} ({seconds:.0f} s)\n{table}")


if __name__ == "__main__":
    main()
