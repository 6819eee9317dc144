"""`transfer predict`: class predictions for unlabelled images, from a checkpoint, an ensemble of
checkpoints, or a model written by `transfer export` (ONNX / TorchScript)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig
from rich.console import Console

from transfer_cli.data.inputs import decoded_chunks, find_inputs
from transfer_cli.data.text import read_texts
from transfer_cli.data.tokens import encode
from transfer_cli.engine.device import Precision, resolve_device
from transfer_cli.errors import UserError
from transfer_cli.models.checkpoint import checkpoint_paths
from transfer_cli.models.ensemble import ENSEMBLES, check_ensemble, check_same_classes
from transfer_cli.models.exported import Predictor, load_predictor
from transfer_cli.reporting.progress import plain_log
from transfer_cli.reporting.tables import rich_table, write_table


def _members(cfg: DictConfig, console: Console) -> list[Predictor]:
    device = resolve_device(cfg.device)
    precision = Precision(str(cfg.precision), device)
    paths = checkpoint_paths(cfg.checkpoint, plain_log(console))
    members = [load_predictor(p, device, precision) for p in paths]
    check_same_classes(members)
    return members


def predict_paths(members: list[Predictor], paths: list[Path], batch_size: int, ensemble: str,
                  weights: list[float] | None) -> tuple[torch.Tensor, dict[int, str]]:
    """Log-probabilities [len(paths), classes] (rows of files that failed stay NaN) and why each failed."""
    out = torch.full((len(paths), len(members[0].recipe.classes)), float("nan"))
    failed: dict[int, str] = {}
    per_member = []
    for member in members:  # each member sees the images through its own preprocessing
        log_probs = out.clone()
        for good, images, problems in decoded_chunks(paths, member.recipe.input):
            failed.update(problems)
            for start in range(0, len(good), batch_size):
                rows = good[start:start + batch_size]
                log_probs[rows] = member.run(images[start:start + batch_size]).log_softmax(1)
        per_member.append(log_probs)
    if len(members) == 1:
        return per_member[0], failed
    return ENSEMBLES.get(ensemble)(torch.stack(per_member), weights), failed


def predict_texts(members: list[Predictor], texts: list[str], batch_size: int, ensemble: str,
                  weights: list[float] | None) -> tuple[torch.Tensor, dict[int, str]]:
    """Log-probabilities [len(texts), classes] of text models (empty texts stay NaN, with the reason)."""
    failed = {i: "empty text" for i, text in enumerate(texts) if not text}
    good = [i for i in range(len(texts)) if i not in failed]
    per_member = []
    for member in members:  # each member tokenizes the texts its own way
        log_probs = torch.full((len(texts), len(members[0].recipe.classes)), float("nan"))
        ids = encode(member.recipe.text, [texts[i] for i in good])
        for start in range(0, len(good), batch_size):
            log_probs[good[start:start + batch_size]] = member.run(ids[start:start + batch_size]).log_softmax(1)
        per_member.append(log_probs)
    if len(members) == 1:
        return per_member[0], failed
    return ENSEMBLES.get(ensemble)(torch.stack(per_member), weights), failed


def run_predict(cfg: DictConfig, out_dir: Path, console: Console | None = None) -> pd.DataFrame:
    console = console or Console()
    if cfg.top_k < 1:
        raise UserError(f"top_k={cfg.top_k} is not allowed: give an integer >= 1 (how many classes to list per image).")
    if cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size} is not allowed: give an integer >= 1.")
    members = _members(cfg, console)
    weights = check_ensemble(cfg.ensemble, len(members))
    text = [m.recipe.text is not None for m in members]
    if any(text) and not all(text):
        raise UserError("checkpoint= mixes text and image models: an ensemble predicts one kind of input.")
    if all(text):
        paths = read_texts(str(cfg.input))
        log_probs, failed = predict_texts(members, paths, cfg.batch_size, cfg.ensemble.name, weights)
    else:
        paths = find_inputs(str(cfg.input))
        log_probs, failed = predict_paths(members, paths, cfg.batch_size, cfg.ensemble.name, weights)
    what, unit = ("text", "texts") if all(text) else ("path", "images")
    classes = members[0].recipe.classes
    k = min(cfg.top_k, len(classes))
    probs = log_probs.exp()
    top_p, top_i = probs.nan_to_num(-1.0).topk(k, dim=1)
    rows = []
    for i, path in enumerate(paths):
        row: dict[str, Any] = {what: str(path)}
        if i in failed:
            row.update({"predicted": None, "probability": None, "error": failed[i]})
        else:
            row.update({"predicted": classes[int(top_i[i, 0])], "probability": float(top_p[i, 0]), "error": None})
            for j in range(k):
                row[f"top{j + 1}"], row[f"top{j + 1}_prob"] = classes[int(top_i[i, j])], float(top_p[i, j])
        rows.append(row)
    table = pd.DataFrame(rows)
    write_table(table, out_dir / "predictions.csv", markdown=False)
    counts = (table["predicted"].value_counts().rename_axis("class").reset_index(name=unit)
              .assign(share=lambda t: (100 * t[unit] / len(paths)).round(1)))
    if failed:
        unusable = "(empty text)" if all(text) else "(not an image / unreadable)"
        counts = pd.concat([counts, pd.DataFrame([{"class": unusable, unit: len(failed),
                                                   "share": round(100 * len(failed) / len(paths), 1)}])])
    source = members[0].kind if len(members) == 1 else f"ensemble of {len(members)} ({cfg.ensemble.name})"
    console.print(rich_table(counts, title=f"{len(paths)} {unit} -> predicted class ({source})"))
    if failed and not all(text):
        shown = "; ".join(f"{paths[i]} ({why})" for i, why in list(failed.items())[:3])
        console.print(f"{len(failed)} file(s) could not be read as images, listed with an error in the CSV: {shown}",
                      highlight=False, soft_wrap=True)
    console.print(f"written to {out_dir / 'predictions.csv'}")
    if len(failed) == len(paths):
        what_failed = f"all {len(paths)} texts are empty" if all(text) else \
            f"none of its {len(paths)} file(s) is a readable image"
        raise UserError(f"input={cfg.input!r}: {what_failed} (each one's reason is in {out_dir / 'predictions.csv'}).")
    return table
