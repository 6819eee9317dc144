"""`transfer train` / `transfer eval` throughput against a minimal hand-written loop on the same model, data
and batch size, measured alternately in one process (ours, minimal, ours, minimal ...). Each side's best
epoch (the first of every run warms up and is left out) is compared: on these 2 shared cores one epoch's
rate varies by 10-30% from run to run, and the best epoch is the one least disturbed by anything else.

The minimal loop is what one would write by hand: shuffle the in-memory uint8 tensor, cut batches by index,
call the method's own ``training_step`` (so both sides compute exactly the same thing), backward, step;
for evaluation, ``model(x)`` under ``torch.inference_mode``. The difference is everything transfer_cli adds:
loader, hooks, progress, meters, the divergence watch.

    python bench/loop_ratio.py [--repeats 2] [--epochs 3]   # needs ../shared/datasets/mnist and usps
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from results_table import record
from rich.console import Console

from transfer_cli.cli import conf_dir
from transfer_cli.config import register_schemas
from transfer_cli.data.augment import BatchAugment
from transfer_cli.data.decoded import DecodedImages
from transfer_cli.data.splits import tensor_view
from transfer_cli.engine.device import Precision, resolve_device
from transfer_cli.engine.loop import evaluate
from transfer_cli.pipeline import build_data
from transfer_cli.run import build_run
from transfer_cli.train import run_train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CPU = torch.device("cpu")


def usps_folder(root: Path) -> Path:
    """USPS (the ESL files) written out as a PNG image folder: the target domain read from files."""
    splits = build_data(compose_cfg(["dataset=usps", f"dataset.root={SHARED / 'usps'}"]).dataset)
    for split in ("train", "test"):
        base, rows, labels = tensor_view(splits.split(split))
        for row, label in zip(rows.tolist(), labels.tolist(), strict=True):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(base.images[row, 0].numpy()).save(folder / f"{row}.png")
    return root


CASES = {
    "small_cnn / digits (tiny steps: overhead shows)": ["dataset=digits", "backbone=small_cnn", "method=finetune"],
    "small_cnn / MNIST (3k)": ["dataset=mnist", f"dataset.root={SHARED / 'mnist'}", "dataset.fraction=0.05",
                               "backbone=small_cnn", "method=finetune"],
    "resnet18 at 32 px / digits": ["dataset=digits", "dataset.image_size=32", "backbone=resnet18",
                                   "method=finetune"],
    "dann MNIST -> USPS folder": ["experiment=mnist_usps", f"dataset.root={SHARED / 'mnist'}", "method=dann",
                                  "target.dataset.name=imagefolder", "target.dataset.root={usps}",
                                  "target.dataset.shots=null"],
}


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=overrides)


def ours(cfg: DictConfig, folder: Path) -> float:
    """Train images per second of `transfer train`'s best epoch after the first, from its metrics table."""
    run_train(cfg, folder, Console(quiet=True))
    metrics = pd.read_csv(folder / "metrics.csv")
    return float(metrics[metrics.split == "train"].samples_per_s.iloc[1:].max())


def minimal(cfg: DictConfig, epochs: int) -> float:
    """Train images per second of the best epoch after the first of the hand-written loop, on the device,
    precision, memory format and compile setting of ``cfg.trainer``."""
    device = resolve_device(cfg.trainer.device)
    precision = Precision(str(cfg.trainer.precision), device)
    run = build_run(cfg, device, precision)  # the model, method and in-memory data `transfer train` builds
    method, optimizer = run.method, run.optimizer
    images, labels = (t.to(device) for t in _tensors(run.splits.train))
    decoded = isinstance(tensor_view(run.splits.train)[0], DecodedImages)
    crop = BatchAugment("none", run.model.spec.size, decoded=decoded)  # decoded photos: centre crop to the input
    if run.target:
        target = _tensors(run.target.train)[0].to(device)
    batch = cfg.dataset.batch_size
    steps = len(labels) // batch
    method.train()
    rates = []
    for _ in range(epochs):
        order = torch.randperm(len(labels), device=device)
        start = time.perf_counter()
        for i in range(steps):
            index = order[i * batch:(i + 1) * batch]
            step = (crop(images[index]), labels[index])
            if run.target:
                step = (*step, target[torch.randint(len(target), (batch,), device=device)])
            with precision.autocast():
                out = method.training_step(step)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - start))
    return max(rates[1:] or rates)


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    base, rows, labels = tensor_view(dataset)
    return base.tensor[rows], labels


def eval_rates(cfg: DictConfig, repeats: int) -> tuple[float, float]:
    """Best test-set pass of `transfer eval`'s inference (loader + ``evaluate``) and of a bare
    ``inference_mode`` loop over the same model, alternating, after one warm-up pass each."""
    run = build_run(cfg, CPU, Precision("32", CPU))
    method, loader = run.method.eval(), run.loader("test", False)
    images, _ = _tensors(run.splits.test)

    def bare() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(images), loader.batch_size):
                method.predict(images[i:i + loader.batch_size])
        return len(images) / (time.perf_counter() - start)

    rates: dict[str, list[float]] = {"ours": [], "minimal": []}
    for _ in range(repeats + 1):
        rates["ours"].append(evaluate(method, loader, CPU, Precision("32", CPU))["samples_per_s"])
        rates["minimal"].append(bare())
    return max(rates["ours"][1:]), max(rates["minimal"][1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    register_schemas()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        usps = usps_folder(Path(tmp) / "usps")
        common = [f"trainer.epochs={args.epochs}", "trainer.progress=plain", "trainer.plots=false",
                  f"output_dir={tmp}"]
        for name, overrides in CASES.items():
            cfg = compose_cfg([o.replace("{usps}", str(usps)) for o in overrides] + common)
            rates: dict[str, list[float]] = {"ours": [], "minimal": []}
            for repeat in range(args.repeats):
                rates["ours"].append(ours(cfg, Path(tmp) / f"{len(rows)}_{repeat}"))
                rates["minimal"].append(minimal(cfg, args.epochs))
            rows.append({"case": f"train: {name}", "batch": cfg.dataset.batch_size,
                         "ours_img_per_s": max(rates["ours"]), "minimal_img_per_s": max(rates["minimal"])})
        cfg = compose_cfg(CASES["small_cnn / MNIST (3k)"] + common)
        rate_ours, rate_minimal = eval_rates(cfg, 2 * args.repeats)
        rows.append({"case": "eval: small_cnn / MNIST test (10k)", "batch": 2 * cfg.dataset.batch_size,
                     "ours_img_per_s": rate_ours, "minimal_img_per_s": rate_minimal})
    for row in rows:
        row["ratio"] = row["ours_img_per_s"] / row["minimal_img_per_s"]
        # what the difference costs per batch; negative: ours was the faster one in its best epoch
        row["extra_ms_per_batch"] = 1000 * row["batch"] * (1 / row["ours_img_per_s"] - 1 / row["minimal_img_per_s"])
    record("loop_ratio", rows, "transfer_cli loop / minimal loop (target >= 0.97)")


if __name__ == "__main__":
    main()
