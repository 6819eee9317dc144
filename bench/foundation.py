"""Foundation-model transfer on real data (needs ../shared), 3 seeds each, written to
bench/results/foundation_<part>.md:

  usps_mobilenet  USPS, 20 labels per class, the shared ImageNet MobileNetV2 at 96 px: linear probe,
                  fine-tune, LP-FT, LoRA, BitFit, and WiSE-FT(probe, fine-tune) with alpha chosen on val.
  lenet_usps      MNIST LeNet-5 -> USPS, 10 labels per class: the same methods, WiSE-FT, and a greedy soup
                  of the three fine-tuned seeds.
  probe_sklearn   the CLI's L-BFGS linear probe (l2=auto) against scikit-learn's LogisticRegression (C chosen
                  on the same validation split) on the same MobileNetV2 features of USPS.

    python bench/foundation.py [--only PART] [--shared ../shared]   # about 50 minutes on 2 CPU cores

Sweeps already finished in --out are reused (delete the folder to measure again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from results_table import record

FAST = ["trainer.progress=none", "trainer.plots=false"]
SEEDS = [0, 1, 2]


def transfer(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "transfer_cli", *args], check=True, capture_output=True)


def sweep(out: Path, name: str, overrides: list[str]) -> list[dict]:
    """Job summaries of ``transfer sweep overrides`` in out/name (reused when it finished before)."""
    folder = out / name
    if not (folder / "sweep.csv").is_file():
        transfer("sweep", *overrides, *FAST, f"hydra.sweep.dir={folder}", f"output_dir={out}")
    runs = [json.loads(p.read_text()) for p in folder.glob("*/summary.json")]
    return sorted(runs, key=lambda r: r["seed"])


def fuse(out: Path, name: str, checkpoints: list[str], fusion: str) -> pd.DataFrame:
    folder = out / "fusion" / name
    if not (folder / "eval.csv").is_file():
        transfer("eval", f"checkpoint=[{','.join(checkpoints)}]", f"fusion={fusion}", f"hydra.run.dir={folder}")
    return pd.read_csv(folder / "eval.csv")


def best_of(summary: dict) -> str:
    return str(Path(summary["run_dir"]) / "checkpoints" / "best.safetensors")


def method_rows(runs: list[dict], label: str) -> dict:
    acc = np.array([r["test"]["acc1"] for r in runs])
    return {"method": label, "test_acc1": f"{acc.mean():.1f} ± {acc.std(ddof=1):.1f}",
            "seeds": len(acc), "trainable": f"{runs[0]['params_trainable']:,} "
            f"({100 * runs[0]['params_trainable'] / runs[0]['params_total']:.1f}%)",
            "s_per_run": round(float(np.mean([r["wall_time_s"] for r in runs])))}


def transfer_table(out: Path, name: str, common: list[str], sweeps: dict[str, list[str]],
                   wise_pairs: list[tuple[str, str]]) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """Each sweep over seeds (and methods), one row per (sweep, method) labelled by the method (and the
    sweep's tag when it is not "default"), then WiSE-FT between each pair of rows, seed by seed."""
    runs: dict[str, list[dict]] = {}
    for tag, extra in sweeps.items():
        for r in sweep(out, f"{name}_{tag}", [*common, *extra, f"seed={','.join(map(str, SEEDS))}"]):
            runs.setdefault(r["method"] if tag == "default" else f"{r['method']} ({tag})", []).append(r)
    rows = [method_rows(r, label) for label, r in runs.items()]
    for ends in wise_pairs:
        wise = []
        for probe, tuned in zip(runs[ends[0]], runs[ends[1]], strict=True):
            tag = "" if ends[1] == "finetune" or "finetune (" in ends[1] else f"_{ends[1].split()[0]}"
            table = fuse(out, f"{name}_wise{tag}_seed{probe['seed']}", [best_of(probe), best_of(tuned)], "wise")
            wise.append(table[table["chosen"]].iloc[0])
        acc = np.array([w["acc1"] for w in wise])
        rows.append({"method": f"WiSE-FT({ends[0]}, {ends[1]}), alpha on val",
                     "test_acc1": f"{acc.mean():.1f} ± {acc.std(ddof=1):.1f}", "seeds": len(acc), "trainable": "-",
                     "s_per_run": "-", "note": "alphas chosen: " + ", ".join(f"{w['alpha']:g}" for w in wise)})
    return pd.DataFrame(rows), runs


def usps_mobilenet(shared: Path, out: Path) -> pd.DataFrame:
    weights = shared / "weights" / "imagenet_mobilenet_v2" / "mobilenet_v2_imagenet1k_dequantized_fp32.safetensors"
    common = ["dataset=usps", f"dataset.root={shared / 'datasets' / 'usps'}", "dataset.shots=20",
              "backbone=mobilenet_v2", f"backbone.weights={weights}", "dataset.image_size=96", "trainer.epochs=15"]
    sweeps = {"default": ["method=linear_probe,finetune,lp_ft,bitfit,lora"],  # adamw lr 2e-3
              "lr2e-4": ["method=finetune,lp_ft", "optimizer.lr=2e-4"],  # 2e-3 wrecks the pretrained features
              "lpft_mult1": ["method=lp_ft", "method.backbone_lr_mult=1", "optimizer.lr=2e-4"]}
    pairs = [("linear_probe", "finetune (lr2e-4)"), ("linear_probe", "lp_ft (lr2e-4)")]  # lp_ft starts from the probe
    table, _ = transfer_table(out, "usps_mobilenet", common, sweeps, pairs)
    return table


def lenet_usps(shared: Path, out: Path) -> pd.DataFrame:
    weights = shared / "weights" / "mnist_lenet5" / "lenet5_mnist.pth"
    common = ["dataset=usps", f"dataset.root={shared / 'datasets' / 'usps'}", "dataset.shots=10", "backbone=lenet",
              f"backbone.weights={weights}", "dataset.mean=[0]", "dataset.std=[1]", "trainer.epochs=15"]
    sweeps = {"default": ["method=linear_probe,finetune,lp_ft,bitfit"],
              "c3c5f6_rank8": ["method=lora", "method.target_modules=[c3,c5,f6]", "method.rank=8"]}
    table, runs = transfer_table(out, "lenet_usps", common, sweeps, [("linear_probe", "finetune"), ("linear_probe", "lp_ft")])
    soup = fuse(out, "lenet_usps_greedy_soup", [best_of(r) for r in runs["finetune"]], "greedy_soup")
    members = soup[soup["members"] == 1]
    final = soup[soup["chosen"]].iloc[0]
    extra = {"method": f"greedy soup of the finetune seeds ({int(final['members'])} kept)",
             "test_acc1": f"{final['acc1']:.1f}", "seeds": 1, "trainable": "-", "s_per_run": "-",
             "note": f"val {final['val_acc1']:.1f} vs best single seed on val {members['val_acc1'].max():.1f}"}
    return pd.concat([table, pd.DataFrame([extra])], ignore_index=True)


def probe_sklearn(shared: Path, out: Path) -> pd.DataFrame:
    import torch
    from sklearn.linear_model import LogisticRegression

    from transfer_cli.config import DatasetConfig, HeadConfig
    from transfer_cli.engine.device import Precision
    from transfer_cli.engine.loop import infer
    from transfer_cli.pipeline import build_data, build_image_model, make_loader

    weights = shared / "weights" / "imagenet_mobilenet_v2" / "mobilenet_v2_imagenet1k_dequantized_fp32.safetensors"
    cpu = torch.device("cpu")
    rows = []
    for shots in (20, None):
        cfg = DatasetConfig(name="usps", root=str(shared / "datasets" / "usps"), shots=shots, image_size=96)
        splits = build_data(cfg)
        model = build_image_model(cfg, splits, "mobilenet_v2", str(weights), HeadConfig()).eval()
        feats = {s: infer(model.features, make_loader(splits.split(s), model.spec, cfg, False, cpu), cpu,
                          Precision("32", cpu)) for s in ("train", "val", "test")}
        (x, y), (vx, vy), (tx, ty) = [(f.numpy(), t.numpy()) for f, t in feats.values()]
        start = time.perf_counter()
        scored = []
        for c in 10.0 ** np.arange(-3, 3):
            clf = LogisticRegression(C=c, max_iter=2000).fit(x, y)
            scored.append((clf.score(vx, vy), c, clf))
        _, c, clf = max(scored, key=lambda t: t[0])
        sk_seconds = time.perf_counter() - start
        overrides = ["dataset=usps", f"dataset.root={cfg.root}", f"dataset.shots={shots or 'null'}",
                     "backbone=mobilenet_v2", f"backbone.weights={weights}", "dataset.image_size=96",
                     "method=linear_probe", "method.l2=auto", "trainer.epochs=5", "seed=0"]
        run = sweep(out, f"probe_sklearn_{shots or 'all'}", overrides)[0]
        rows.append({"train_labels": len(splits.train), "cli_probe_test_acc1": round(run["test"]["acc1"], 2),
                     "cli_l2": run.get("l2"), "sklearn_test_acc1": round(100 * clf.score(tx, ty), 2), "sklearn_C": c,
                     "sklearn_fit_s": round(sk_seconds, 1)})
    return pd.DataFrame(rows)


PARTS = {"usps_mobilenet": usps_mobilenet, "lenet_usps": lenet_usps, "probe_sklearn": probe_sklearn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "outputs" / "bench" / "foundation")
    parser.add_argument("--only", choices=sorted(PARTS))
    args = parser.parse_args()
    if not args.shared.is_dir():
        print(f"{args.shared} is absent: these measurements need the shared real data and weights; skipped.")
        return
    for name, part in PARTS.items():
        if args.only and name != args.only:
            continue
        start = time.perf_counter()
        table = part(args.shared.resolve(), args.out.resolve())
        record(f"foundation_{name}", table, f"python bench/foundation.py --only {name} "
                                            f"({time.perf_counter() - start:.0f} s here)")


if __name__ == "__main__":
    main()
