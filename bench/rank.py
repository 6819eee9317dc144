"""Does `transfer rank` order candidate backbones as training them does? (needs ../shared)

A pool of 17 candidates: ImageNet MobileNetV2 (96 px), CIFAR-10 ResNet-20/32/44/56, MNIST LeNet-5, small CNNs
this CLI pretrains on other tasks and budgets (digits 0-4 for 1 and 30 epochs, 5 % of MNIST for 5 epochs), layer
cuts of the pretrained bodies (MobileNetV2 after stages 7 and 14 of 19, ResNet-56 after layer2, LeNet-5 before
its last layer), and random-init copies as negative controls (MobileNetV2, ResNet-20, LeNet-5, small CNN). Targets: USPS, MNIST
(val 2 %), digits 5-9; 10 and 100 labels per class (digits: 10 and 50, its classes hold ~110 train images);
3 draws each. For every setting, `transfer rank ... validate=all` scores the pool on the labelled train split
and trains every candidate as a linear probe (GT1: test top-1, L2 chosen on val).

Per score: weighted tau (scipy.stats.weightedtau, as LogME reports) and Kendall tau_b against GT1, with and
without the random-init controls, the top-1 regret, and 95 % intervals from resampling the settings; the
noise ceiling is the weighted tau between the GT1 orders of two draws of the same target and shots.
``--finetune`` adds GT2 on draw 0 of every target and shots: every candidate fine-tuned (15 epochs) at each rate
of LR_GRID, the rate kept by val top-1, and the cost of ranking against fine-tuning the pool.
``--jobs N`` runs N `transfer rank` processes at once (on a GPU machine; one is right for 2 CPU cores).

    python bench/rank.py [--shared ../shared] [--out outputs/bench/rank] [--draws 3] [--finetune] [--jobs 1]
                         [--finished-only]

Writes bench/results/rank_scores.csv/.md (one row per score), rank_targets.csv/.md (per target and shots),
rank_runs.csv (every candidate of every setting), with --finetune rank_finetune.csv/.md and rank_gt2.csv.
Settings already ranked in --out with a pool of the same size are reused.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from results_table import record
from scipy import stats

SCORES = ["logme", "leep", "nce", "hscore", "sfda", "knn", "probe", "size"]
TRAIN_QUIET = ["trainer.progress=none", "trainer.plots=false"]
LR_GRID = ("1e-3", "3e-3", "1e-2")  # GT2: AdamW; a body with weights from elsewhere trains at 0.1x (the default)


def transfer(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "transfer_cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"transfer {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def sources(out: Path, shared: Path) -> dict[str, Path]:
    """Small CNNs pretrained by this CLI on other tasks and budgets (trained once, reused)."""
    recipes = {
        "digits0to4_1ep": ["dataset=digits", "dataset.classes=[0,1,2,3,4]", "trainer.epochs=1"],
        "digits0to4_30ep": ["dataset=digits", "dataset.classes=[0,1,2,3,4]", "trainer.epochs=30"],
        "mnist5pct_5ep": ["dataset=mnist", f"dataset.root={shared / 'datasets' / 'mnist'}", "dataset.fraction=0.05",
                          "dataset.val_fraction=0.02", "trainer.epochs=5"],
    }
    made = {}
    for name, overrides in recipes.items():
        folder = out / "sources" / name
        if not (folder / "summary.json").is_file():
            transfer("train", "backbone=small_cnn", "method=scratch", *overrides, *TRAIN_QUIET,
                     f"hydra.run.dir={folder}", f"output_dir={out}")
        made[name] = folder / "checkpoints" / "best.safetensors"
    return made


def pool(shared: Path, made: dict[str, Path]) -> list[tuple[str, dict, bool]]:
    """(label, candidate, is a random-init control)."""
    w = shared / "weights"
    mbv2 = w / "imagenet_mobilenet_v2" / "mobilenet_v2_imagenet1k_dequantized_fp32.safetensors"
    at96 = {"preprocess": {"crop": 96}}
    entries = [("mobilenet_v2 imagenet", {"name": "mobilenet_v2", "weights": str(mbv2), **at96}, False),
               *[(f"cifar_resnet{d} cifar10", {"name": f"cifar_resnet{d}", "weights": str(next(
                   (w / "cifar10_resnets").glob(f"resnet{d}-*.th")))}, False) for d in (20, 32, 44, 56)],
               ("lenet mnist", {"name": "lenet", "weights": str(w / "mnist_lenet5" / "lenet5_mnist.pth")}, False),
               *[(f"small_cnn {name}", {"name": "small_cnn", "weights": str(path)}, False) for name, path in made.items()],
               *[(f"mobilenet_v2 imagenet cut {k}", {"name": "mobilenet_v2", "weights": str(mbv2), "cut": k, **at96}, False)
                 for k in (7, 14)],
               ("cifar_resnet56 cifar10 cut 3", {"name": "cifar_resnet56", "cut": 3, "weights": str(next(
                   (w / "cifar10_resnets").glob("resnet56-*.th")))}, False),
               ("lenet mnist cut 3", {"name": "lenet", "weights": str(w / "mnist_lenet5" / "lenet5_mnist.pth"), "cut": 3},
                False),
               ("mobilenet_v2 random", {"name": "mobilenet_v2", "weights": "none", **at96}, True),
               ("cifar_resnet20 random", {"name": "cifar_resnet20", "weights": "none"}, True),
               ("lenet random", {"name": "lenet", "weights": "none"}, True),
               ("small_cnn random", {"name": "small_cnn", "weights": "none"}, True)]
    return entries


def hydra_value(value: object) -> str:
    """A candidate written as a Hydra override value (paths quoted)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return f"'{value}'" if isinstance(value, str) and ("/" in value or "." in value) else str(value)


def targets(shared: Path) -> dict[str, tuple[list[str], tuple[int, int]]]:
    data = shared / "datasets"
    return {"usps": (["dataset=usps", f"dataset.root={data / 'usps'}"], (10, 100)),
            "mnist": (["dataset=mnist", f"dataset.root={data / 'mnist'}", "dataset.val_fraction=0.02"], (10, 100)),
            "digits5to9": (["dataset=digits", "dataset.classes=[5,6,7,8,9]"], (10, 50))}


def folder_of(out: Path, name: str, entries: list) -> Path:
    """A setting's folder, tagged with the pool's size: results of another pool are never reused."""
    return out / f"{name}_pool{len(entries)}"


def rank_setting(out: Path, name: str, dataset: list[str], shots: int, draw: int, entries: list, method: str,
                 extra: list[str]) -> Path:
    folder = folder_of(out, name, entries)
    if not (folder / "validation.csv").is_file():
        candidates = "[" + ",".join(hydra_value(c) for _, c, _ in entries) + "]"
        overrides = ",".join(f"'{o}'" for o in [*TRAIN_QUIET, *extra])
        transfer("rank", *dataset, f"dataset.shots={shots}", f"dataset.shots_seed={draw}", f"seed={draw}",
                 f"candidates={candidates}", "bootstrap=0", "validate=all", f"validate_method={method}",
                 f"validate_overrides=[{overrides}]", f"hydra.run.dir={folder}", f"output_dir={out}")
    return folder


def agreement(table: pd.DataFrame, truth: str) -> list[dict]:
    rows = []
    for controls in (True, False):
        part = table if controls else table[~table["control"]]
        measured = part[truth].to_numpy(float)
        for score in SCORES:
            values = part[score].to_numpy(float)
            ok = np.isfinite(values)
            if ok.sum() < 3:
                continue
            rows.append({"score": score, "controls": controls,
                         "weighted_tau": stats.weightedtau(values[ok], measured[ok]).statistic,
                         "kendall_tau_b": stats.kendalltau(values[ok], measured[ok], variant="b").statistic,
                         "regret": float(measured[ok].max() - measured[ok][np.argmax(values[ok])])})
    return rows


def interval(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = [rng.choice(values, len(values)).mean() for _ in range(2000)]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarise(per_setting: pd.DataFrame, ceiling: dict[bool, float]) -> list[dict]:
    rows = []
    for score, part in per_setting.groupby("score", sort=False):
        row: dict = {"score": score}
        for controls, tag in ((True, "with controls"), (False, "without")):
            sub = part[part["controls"] == controls]
            low, high = interval(sub["weighted_tau"].to_numpy())
            row[f"weighted_tau ({tag})"] = f"{sub['weighted_tau'].mean():.2f} [{low:.2f}, {high:.2f}]"
            row[f"kendall ({tag})"] = round(sub["kendall_tau_b"].mean(), 2)
            row[f"regret ({tag})"] = round(sub["regret"].mean(), 2)
        row["settings"] = len(part) // 2
        rows.append(row)
    rows.append({"score": "noise ceiling (GT1 of two draws)", "weighted_tau (with controls)": f"{ceiling[True]:.2f}",
                 "weighted_tau (without)": f"{ceiling[False]:.2f}"})
    return rows


def noise_ceiling(runs: pd.DataFrame) -> dict[bool, float]:
    found: dict[bool, list[float]] = {True: [], False: []}
    for _, part in runs.groupby(["target", "shots"]):
        draws = [d.set_index("candidate")["gt1"] for _, d in part.groupby("draw")]
        for a, b in itertools.combinations(draws, 2):
            for controls in (True, False):
                keep = [c for c in a.index if controls or not part.set_index("candidate").loc[c, "control"].any()]
                found[controls].append(stats.weightedtau(a[keep].to_numpy(), b[keep].to_numpy()).statistic)
    return {k: float(np.mean(v)) for k, v in found.items()}


def finetune_name(target: str, shots: int, lr: str) -> str:
    return f"finetune_{target}_{shots}_lr{lr}"


def finetune_truth(out: Path, targets_: dict, entries: list, runs: pd.DataFrame) -> None:
    """GT2 on draw 0 of each target and shots: each candidate's test top-1 at the rate its val top-1 prefers."""
    gt2_rows, agree = [], []
    for target, (_, shot_levels) in targets_.items():
        for shots in shot_levels:
            folders = {lr: folder_of(out, finetune_name(target, shots, lr), entries) for lr in LR_GRID}
            if not all((f / "validation.csv").is_file() for f in folders.values()):
                continue
            by_lr = {lr: [json.loads((f / "validate" / str(i) / "summary.json").read_text())
                          for i in range(len(entries))] for lr, f in folders.items()}
            rows = []
            for i, (label, _, control) in enumerate(entries):
                lr, best = max(((lr, s[i]) for lr, s in by_lr.items()), key=lambda t: t[1]["at_best"]["val"]["acc1"])
                rows.append({"target": target, "shots": shots, "candidate": label, "control": control, "lr": lr,
                             "gt2": best["test"]["acc1"],
                             "finetune_s": float(np.mean([s[i]["wall_time_s"] for s in by_lr.values()]))})
            gt2 = pd.DataFrame(rows)
            gt2_rows += rows
            setting = runs[(runs.target == target) & (runs.shots == shots) & (runs.draw == 0)].merge(
                gt2, on=["target", "shots", "candidate", "control"])
            cost = {"rank_s": setting["rank_s"].sum(), "finetune_all_s": setting["finetune_s"].sum()}
            agree += [{"target": target, "shots": shots, **r, **cost} for r in agreement(setting, "gt2")]
            agree += [{"target": target, "shots": shots, "score": "gt1 (probe accuracy)", "controls": controls,
                       **_gt1_row(setting, controls), **cost} for controls in (True, False)]
    pd.DataFrame(gt2_rows).to_csv(Path(__file__).resolve().parent / "results" / "rank_gt2.csv", index=False)
    per_setting = pd.DataFrame(agree)
    rows = []
    for (score, controls), part in per_setting.groupby(["score", "controls"], sort=False):
        low, high = interval(part["weighted_tau"].to_numpy())
        rows.append({"score": score, "controls": controls, "settings": len(part),
                     "weighted_tau": f"{part['weighted_tau'].mean():.2f} [{low:.2f}, {high:.2f}]",
                     "kendall_tau_b": round(part["kendall_tau_b"].mean(), 2), "regret": round(part["regret"].mean(), 2),
                     "rank_cost_pct": round(100 * part["rank_s"].sum() / part["finetune_all_s"].sum(), 1)})
    record("rank_finetune", rows, "weighted tau of each score against fine-tune accuracy at the best of "
           f"lr {'/'.join(LR_GRID)} on val (GT2), draw 0 of each target and shots; rank_cost_pct: ranking the "
           "pool over fine-tuning it once at one rate")


def _gt1_row(setting: pd.DataFrame, controls: bool) -> dict:
    """How the probe's measured accuracy (GT1) itself orders the fine-tuned pool: the ceiling a probe-based
    score could reach against GT2."""
    part = setting if controls else setting[~setting["control"]]
    gt1, gt2 = part["gt1"].to_numpy(float), part["gt2"].to_numpy(float)
    return {"weighted_tau": stats.weightedtau(gt1, gt2).statistic,
            "kendall_tau_b": stats.kendalltau(gt1, gt2, variant="b").statistic,
            "regret": float(gt2.max() - gt2[np.argmax(gt1)])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "outputs" / "bench" / "rank")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--finetune", action="store_true")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--targets", nargs="+", choices=["usps", "mnist", "digits5to9"],
                        help="only these targets (default: all)")
    parser.add_argument("--shots", nargs="+", type=int, help="only these label counts (default: each target's)")
    parser.add_argument("--finished-only", action="store_true", help="summarise the settings already ranked in --out")
    args = parser.parse_args()
    out, shared = args.out.resolve(), args.shared.resolve()
    entries = pool(shared, sources(out, shared))
    chosen = {t: (d, [n for n in levels if not args.shots or n in args.shots])
              for t, (d, levels) in targets(shared).items() if not args.targets or t in args.targets}
    settings = {(target, shots, draw): dataset for target, (dataset, shot_levels) in chosen.items()
                for shots, draw in itertools.product(shot_levels, range(args.draws))}
    if not settings:
        raise SystemExit(f"--targets {args.targets} --shots {args.shots} --draws {args.draws}: no setting left to rank "
                         "(shots per target: usps and mnist 10/100, digits5to9 10/50; draws >= 1)")
    if args.finished_only:
        settings = {k: v for k, v in settings.items()
                    if (folder_of(out, "_".join(map(str, k)), entries) / "validation.csv").is_file()}
    work = {"_".join(map(str, k)): (d, k[1], k[2], "linear_probe", []) for k, d in settings.items()}
    if args.finetune and not args.finished_only:  # first: the longest jobs
        work = {**{finetune_name(t, n, lr): (d, n, 0, "finetune", [f"optimizer.lr={lr}", "trainer.epochs=15"])
                   for t, (d, levels) in chosen.items() for n in levels for lr in LR_GRID}, **work}
    started = time.perf_counter()

    def run(name: str) -> None:
        rank_setting(out, name, *work[name][:3], entries, *work[name][3:])
        print(f"{name}: done at {time.perf_counter() - started:.0f} s", flush=True)

    with ThreadPoolExecutor(args.jobs) as jobs:  # each job is a `transfer rank` process
        list(jobs.map(run, work))
    rows = []
    for (target, shots, draw) in settings:
        ranked = pd.read_csv(folder_of(out, f"{target}_{shots}_{draw}", entries) / "rank.csv")
        for (label, _, control), (_, r) in zip(entries, ranked.iterrows(), strict=True):
            rows.append({"target": target, "shots": shots, "draw": draw, "candidate": label, "control": control,
                         **{s: r.get(s, np.nan) for s in SCORES}, "gt1": r["measured_acc1"],
                         "rank_s": r["seconds"], "error": r.get("error", "")})
    runs = pd.DataFrame(rows)
    runs.to_csv(Path(__file__).resolve().parent / "results" / "rank_runs.csv", index=False)
    per_setting = []
    for (target, shots, draw), part in runs.groupby(["target", "shots", "draw"], sort=False):
        per_setting += [{"target": target, "shots": shots, "draw": draw, **r} for r in agreement(part, "gt1")]
    per_setting = pd.DataFrame(per_setting)
    record("rank_scores", summarise(per_setting, noise_ceiling(runs)),
           "weighted tau of each score against probe accuracy (GT1), mean over settings [95% interval]")
    by_target = (per_setting[per_setting["controls"]].groupby(["target", "shots", "score"], sort=False)
                 [["weighted_tau", "regret"]].mean().round(2).reset_index())
    record("rank_targets", by_target.to_dict("records"), "per target and shots (with controls)")
    if args.finetune:
        finetune_truth(out, chosen, entries, runs)


if __name__ == "__main__":
    main()
