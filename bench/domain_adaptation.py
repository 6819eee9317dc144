"""Domain adaptation on digits (needs ../shared/datasets/mnist and usps), 3 seeds per method, written to
bench/results/da_<part>.md/.csv:

  mnist_usps    MNIST -> USPS, the ADDA protocol (experiment=mnist_usps): every DA method (fixmatch_da in a sweep
                of its own, added after the others).
  usps_mnist    USPS -> MNIST, the same.
  color_digits  MNIST -> colour-texture digits (MNIST-M-style, made by transfer_cli.data.color_digits) with an
                RGB LeNet (backbone.in_channels=3): source_only, dann, cdan_e_mcc and fixmatch_da, and fixmatch_da
                without its pseudo-labels (method.weight=0: source cross-entropy on plain + strong views only),
                which shows how much of its gain the strong views alone bring.
  alignment     `transfer analyze` of the seed-0 MNIST -> USPS checkpoints of source_only, dann and cdan_e_mcc:
                proxy A-distance table, and features.png per method under --out/alignment/<method>/.

Each part also writes da_<part>_validators.md: the target test accuracy of the checkpoint each label-free
validator picks, next to the oracle (the best target test epoch: uses target labels, for reference only).

    python bench/domain_adaptation.py [--only PART] [--jobs 2]   # about 90 minutes on 2 CPU cores

Sweeps already finished in --out are reused (delete the folder to measure again).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
from results_table import record

SEEDS = "0,1,2"
METHODS = "source_only,dann,cdan,cdan_e,coral,dan,mcc,shot,cdan_e_mcc"
# USPS -> MNIST runs in two sweeps, the baselines and the strongest methods first
CORE_METHODS, MORE_METHODS = "source_only,dann,cdan_e_mcc,shot,mcc", "cdan,cdan_e,coral,dan"
COLOR_METHODS = "source_only,dann,cdan_e_mcc"


def sweep(out: Path, name: str, overrides: list[str], jobs: int) -> Path:
    """``transfer sweep`` into out/name (kept as it is when it finished before); the sweep folder."""
    folder = out / name
    if not (folder / "summary.csv").is_file():
        subprocess.run([sys.executable, "-m", "transfer_cli", "sweep", *overrides, f"seed={SEEDS}",
                        "trainer.progress=none", "trainer.plots=false", f"hydra.sweep.dir={folder}",
                        f"output_dir={out}", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"], check=True)
    return folder


def tables(folders: list[Path], part: str, labels: dict[Path, str] | None = None) -> None:
    """The method table (target test top-1, mean and std over seeds) and the validator table of the sweeps;
    ``labels`` names the method of a folder that swept no method (its tables have no method column) or whose runs
    differ from another's by an override only."""
    labels = labels or {}

    def read(folder: Path, table: str) -> pd.DataFrame:
        frame = pd.read_csv(folder / table)
        return frame.assign(method=labels[folder]) if folder in labels else frame

    summary = pd.concat([read(f, "summary.csv") for f in folders if (f / "summary.csv").is_file()])
    columns = [c for c in ("method", "target_test_acc1_mean", "target_test_acc1_std", "published_target_acc1",
                           "val_acc1_mean", "seconds_mean", "n") if c in summary.columns]
    record(f"da_{part}", summary[columns].round(2).to_dict("records"), f"{part}: target test top-1, 3 seeds")
    validators = pd.concat([read(f, "validators.csv") for f in folders if (f / "validators.csv").is_file()])
    record(f"da_{part}_validators", validators.to_dict("records"),
           f"{part}: target top-1 of the checkpoint each validator picks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["mnist_usps", "usps_mnist", "color_digits", "alignment"])
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/domain_adaptation"))
    args = parser.parse_args()
    datasets = Path(args.shared) / "datasets"
    roots = [f"dataset.root={datasets / 'mnist'}", f"target.dataset.root={datasets / 'usps'}"]
    usps_mnist = ["experiment=usps_mnist", f"dataset.root={datasets / 'usps'}",
                  f"target.dataset.root={datasets / 'mnist'}"]
    if args.only in (None, "mnist_usps"):
        folder = sweep(args.out, "mnist_usps", ["experiment=mnist_usps", f"method={METHODS}", *roots], args.jobs)
        self_training = sweep(args.out, "mnist_usps_fixmatch", ["experiment=mnist_usps", "method=fixmatch_da", *roots],
                              args.jobs)
        tables([folder, self_training], "mnist_usps", {self_training: "fixmatch_da"})
    if args.only in (None, "usps_mnist"):
        folder = sweep(args.out, "usps_mnist", [*usps_mnist, f"method={CORE_METHODS}"], args.jobs)
        tables([folder], "usps_mnist")
    if args.only in (None, "color_digits"):
        from transfer_cli.data.color_digits import make_color_digits

        images = args.out / "color_digits_images"
        if not (images / "test").is_dir():
            shutil.rmtree(images, ignore_errors=True)
            make_color_digits(images, str(datasets / "mnist"))
        common = ["experiment=mnist_color_digits", f"dataset.root={datasets / 'mnist'}",
                  f"target.dataset.root={images.resolve()}"]
        folder = sweep(args.out, "color_digits", [*common, f"method={COLOR_METHODS}"], args.jobs)
        self_training = sweep(args.out, "color_digits_fixmatch", [*common, "method=fixmatch_da"], args.jobs)
        views_only = sweep(args.out, "color_digits_strong_views", [*common, "method=fixmatch_da", "method.weight=0"],
                           args.jobs)
        tables([folder, self_training, views_only], "color_digits",
               {self_training: "fixmatch_da", views_only: "fixmatch_da, weight 0 (strong views only)"})
    if args.only in (None, "alignment"):
        alignment(args.out)
    if args.only in (None, "usps_mnist"):
        self_training = sweep(args.out, "usps_mnist_fixmatch", [*usps_mnist, "method=fixmatch_da"], args.jobs)
        tables([args.out / "usps_mnist", self_training], "usps_mnist", {self_training: "fixmatch_da"})
        more = sweep(args.out, "usps_mnist_more", [*usps_mnist, f"method={MORE_METHODS}"], args.jobs)
        tables([args.out / "usps_mnist", self_training, more], "usps_mnist", {self_training: "fixmatch_da"})


def alignment(out: Path) -> None:
    rows = []
    for method in ("source_only", "dann", "cdan_e_mcc"):
        job = next(j for j in sorted((out / "mnist_usps").glob("*/.hydra/overrides.yaml"))
                   if {f"method={method}", "seed=0"} <= set(j.read_text().replace("- ", "").split()))
        folder = out / "alignment" / method
        if not (folder / "alignment.csv").is_file():
            subprocess.run([sys.executable, "-m", "transfer_cli", "analyze",
                            f"checkpoint={job.parent.parent / 'checkpoints' / 'best.safetensors'}",
                            f"hydra.run.dir={folder}"], check=True)
        rows.append({"method": method, **pd.read_csv(folder / "alignment.csv").iloc[0].to_dict()})
    record("da_alignment", rows, "MNIST -> USPS, seed 0: proxy A-distance of the penultimate features")


if __name__ == "__main__":
    main()
