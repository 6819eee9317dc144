"""`transfer export`: a checkpoint as ONNX or TorchScript (optionally dynamic or static int8), verified against
PyTorch on real images of its dataset, with size and CPU latency in export.csv/.md."""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig
from rich.console import Console

from transfer_cli.data.inputs import model_input
from transfer_cli.engine.device import Precision
from transfer_cli.errors import UserError, bad_value
from transfer_cli.files import atomic_write_text
from transfer_cli.models.exported import (
    FORMATS,
    Predictor,
    export_onnx,
    export_torchscript,
    onnx_predictor,
    quantize_onnx,
    quantize_onnx_static,
    quantize_torch,
    torch_predictor,
    torchscript_predictor,
)
from transfer_cli.reporting.progress import plain_log
from transfer_cli.reporting.tables import rich_table, write_table
from transfer_cli.scoring import Opened, open_checkpoints

QUANTIZE = ("none", "dynamic", "static")
CPU = torch.device("cpu")


def _check(cfg: DictConfig) -> None:
    if cfg.format not in FORMATS:
        raise bad_value("format", cfg.format, list(FORMATS))
    if cfg.quantize not in QUANTIZE:
        raise bad_value("quantize", cfg.quantize, QUANTIZE)
    if not isinstance(cfg.opset, int) or not 17 <= cfg.opset <= 23:
        raise bad_value("opset", cfg.opset, "an ONNX opset from 17 to 23 (the exporter's range)")
    if cfg.quantize == "static" and cfg.format != "onnx":
        raise bad_value("quantize", cfg.quantize, "none or dynamic with format=torchscript; static is onnxruntime's "
                        "static quantization (format=onnx)")
    if cfg.calibration < 1:
        raise bad_value("calibration", cfg.calibration, "an integer >= 1 (training images that set the int8 ranges)")
    if cfg.samples < 1:
        raise bad_value("samples", cfg.samples, "an integer >= 1 (real images to verify the export on)")
    if str(cfg.checkpoint).endswith((".onnx", ".pt", ".ts")):
        raise UserError(f"checkpoint={cfg.checkpoint!r} is already an exported model: export a .safetensors "
                        "checkpoint written by `transfer train` (or `transfer eval fusion=...`).")


def _real_images(opened: Opened, split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` images of the opened data's ``split`` as exported models take them, their labels."""
    member = opened.members[0]
    images, labels = [], []
    for x, y in opened.loader(member, split, CPU, 64, lambda _: None):
        images.append(model_input(x, member.model.spec))
        labels.append(y)
        if sum(len(b) for b in images) >= count:
            break
    labels = torch.cat(labels)[:count]
    if opened.order is not None:  # the dataset numbers the classes otherwise: compare in the model's numbering
        labels = torch.tensor(opened.order)[labels]
    return torch.cat(images)[:count], labels


def _latency_ms(run: Any, images: torch.Tensor, batch: int, repeats: int) -> float:
    """Median wall time per image of ``run`` on batches of ``batch`` images (after one warm-up call)."""
    x = images[:batch] if len(images) >= batch else images.repeat((batch + len(images) - 1) // len(images), 1, 1, 1)[:batch]
    run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / batch


def _logits(predictor: Predictor, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([predictor.run(images[i:i + 32]) for i in range(0, len(images), 32)])


def run_export(cfg: DictConfig, out_dir: Path, console: Console | None = None) -> pd.DataFrame:
    console = console or Console()
    _check(cfg)
    opened = open_checkpoints([str(cfg.checkpoint)], {"test"}, cfg.dataset, cfg.dataset_changes,
                              plain_log(console))
    model, dataset = opened.members[0].model, opened.data.name
    recipe = model.recipe
    if recipe.text is not None:
        raise UserError(f"checkpoint={cfg.checkpoint!r} is a text model (backbone={recipe.backbone}): export covers "
                        "image models. Use the checkpoint itself with `transfer predict` and `transfer eval`.")
    images, labels = _real_images(opened, "test", cfg.samples)
    precision = Precision("32", CPU)
    eager = torch_predictor(str(cfg.checkpoint), model, recipe, CPU, precision)
    target = out_dir / f"model{FORMATS[cfg.format]}"
    example = images[:2]
    variants: list[tuple[str, Predictor, Path | None]] = [("pytorch (eager)", eager, None)]
    start = time.perf_counter()
    if cfg.format == "onnx":
        export_onnx(model, example, target, cfg.opset, recipe)
        variants.append((f"onnx (opset {cfg.opset})", onnx_predictor(str(target)), target))
        if cfg.quantize in ("dynamic", "static"):  # static is reported next to dynamic
            quantized = out_dir / "model.int8.onnx"
            quantize_onnx(target, quantized)
            variants.append(("onnx dynamic int8", onnx_predictor(str(quantized)), quantized))
        if cfg.quantize == "static":
            static = out_dir / "model.int8-static.onnx"
            quantize_onnx_static(target, static, _real_images(opened, "train", cfg.calibration)[0])
            variants.append((f"onnx static int8 ({cfg.calibration} train images)", onnx_predictor(str(static)), static))
    else:
        export_torchscript(model, example, target, recipe)
        variants.append(("torchscript", torchscript_predictor(str(target), CPU, precision), target))
        if cfg.quantize == "dynamic":
            quantized = out_dir / "model.int8.pt"
            export_torchscript(quantize_torch(copy.deepcopy(model)), example, quantized, recipe)
            variants.append(("torchscript dynamic int8 (Linear)", torchscript_predictor(str(quantized), CPU, precision),
                             quantized))
    export_seconds = time.perf_counter() - start
    atomic_write_text(out_dir / "model.json", json.dumps({"recipe": recipe.to_dict(), "source": str(cfg.checkpoint),
                                                          "input": "uint8 RGB [N, 3, size, size]"}, indent=2))

    reference = _logits(eager, images)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for name, predictor, path in variants:
        logits = reference if predictor is eager else _logits(predictor, images)
        rows.append({
            "model": name,
            "file_mb": round((path.stat().st_size if path else _state_bytes(model)) / 2**20, 3),
            "params": params,
            "images": len(images),
            "max_abs_logit_diff": float((logits - reference).abs().max()),
            "top1_agreement": 100.0 * float((logits.argmax(1) == reference.argmax(1)).float().mean()),
            "acc1": 100.0 * float((logits.argmax(1) == labels).float().mean()),
            "ms_per_image_b1": round(_latency_ms(predictor.run, images, 1, cfg.repeats), 3),
            "ms_per_image_b32": round(_latency_ms(predictor.run, images, 32, max(3, cfg.repeats // 4)), 3),
        })
    table = pd.DataFrame(rows)
    write_table(table, out_dir / "export.csv", markdown=True)
    console.print(rich_table(table, title=f"export of {recipe.backbone} ({dataset} test images, CPU)"))
    exported = rows[1]
    if exported["top1_agreement"] < 100.0 or exported["max_abs_logit_diff"] > 1e-3:
        console.print(f"[yellow]the {cfg.format} model differs from PyTorch beyond float rounding "
                      f"(max |diff| {exported['max_abs_logit_diff']:.2e}, top-1 agreement "
                      f"{exported['top1_agreement']:.1f}%): check export.csv before shipping it.[/]")
    console.print(f"written {target} (+ model.json) in {export_seconds:.1f} s; table in {out_dir / 'export.csv'}")
    return table


def _state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
