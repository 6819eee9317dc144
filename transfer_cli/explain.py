"""`transfer explain`: which pixels a checkpoint's predictions rest on (models/attribution.py), for samples of
a split or for image files, with the sanity check and the deletion curve that say whether to trust the maps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from rich.console import Console

from transfer_cli.config import SPLITS
from transfer_cli.data.inputs import decoded_chunks, find_inputs
from transfer_cli.data.text import read_texts
from transfer_cli.data.tokens import PAD, encode, from_pretrained
from transfer_cli.engine.device import resolve_device
from transfer_cli.errors import UserError, bad_value
from transfer_cli.files import atomic_write
from transfer_cli.models import attribution
from transfer_cli.models.backbone import Classifier
from transfer_cli.pipeline import prepare_splits, sample_loader
from transfer_cli.reporting.plots import overlay, plot_explanations
from transfer_cli.reporting.progress import plain_log
from transfer_cli.reporting.tables import rich_table, write_table
from transfer_cli.reporting.token_html import write_token_html
from transfer_cli.scoring import Opened, open_checkpoints

GRID_ROWS = 16  # explain.png shows at most this many samples; every sample gets its own picture
DELETION = [0.0, 0.05, 0.1, 0.2, 0.5]


@dataclass
class Samples:
    """What is explained: images as the model takes them, and one table row per sample or unreadable file."""

    images: torch.Tensor  # uint8 [N, C, S, S]
    rows: list[dict[str, Any]]  # per image: its name and true class (when known)
    failed: list[dict[str, Any]]  # files that could not be read, with the reason


def _check(cfg: DictConfig) -> None:
    if cfg.attribution not in ("auto", *attribution.METHODS):
        raise bad_value("method", cfg.attribution, ("auto", *attribution.METHODS))
    if cfg.split not in SPLITS:
        raise bad_value("split", cfg.split, SPLITS)
    if cfg.samples < 1:
        raise bad_value("samples", cfg.samples, "an integer >= 1 (samples of the split to explain)")
    if cfg.steps < 2:
        raise bad_value("steps", cfg.steps, "an integer >= 2 (integrated gradients' path steps)")
    if cfg.window < 0:
        raise bad_value("window", cfg.window, "an integer >= 0 (occlusion's patch side in input pixels; 0: side / 8)")


def run_explain(cfg: DictConfig, out_dir: Path, console: Console | None = None) -> pd.DataFrame:
    console = console or Console()
    _check(cfg)
    log = plain_log(console)
    paths = [str(cfg.checkpoint), *([str(cfg.compare)] if cfg.compare else [])]
    scored = {cfg.split} if cfg.input is None else set()
    opened = open_checkpoints(paths, scored, cfg.dataset, cfg.dataset_changes, log)
    models = [m.model for m in opened.members]
    device = resolve_device(cfg.device)
    for model in models:
        model.to(device).eval()
    text = models[0].recipe.text is not None
    if cfg.attribution == "auto":
        cfg.attribution = "integrated_gradients" if text else "gradcam"
    if text:
        return _explain_texts(cfg, opened, device, out_dir, console)
    samples = _split_samples(cfg, opened, device) if cfg.input is None else _file_samples(cfg, models[0])
    if len(samples.images) == 0:
        raise UserError(f"input={cfg.input!r}: none of its {len(samples.failed)} file(s) could be read as an image.")
    x = samples.images.to(device)
    table, maps = _explain(cfg, models, x, samples, opened.members[0].model.recipe.classes)
    _write(cfg, out_dir, samples, table, maps, console)
    return table


def _split_samples(cfg: DictConfig, opened: Opened, device: torch.device) -> Samples:
    model = opened.members[0].model
    prepared = prepare_splits(opened.splits, model.spec, opened.data, lambda _: None)
    split = prepared.split(cfg.split)
    if len(split) == 0:
        raise UserError(f"split={cfg.split}: dataset={opened.data.name} has no {cfg.split} samples here.")
    images, labels = zip(*sample_loader(split, model.spec, opened.data, device, cfg.samples, cfg.seed), strict=True)
    names = list(opened.splits.classes)
    rows = [{"sample": f"{cfg.split}[{i}]", "true": names[int(y)]} for i, y in enumerate(torch.cat(labels))]
    return Samples(torch.cat(images).cpu(), rows, [])


def _explain_texts(cfg: DictConfig, opened: Opened, device: torch.device, out_dir: Path,
                   console: Console) -> pd.DataFrame:
    """Integrated gradients per token (models/attribution.py) of a text model's predictions: explain.csv (one row
    per text), tokens.csv (one per token) and explain.html (the tokens shaded by their scores)."""
    model, spec = opened.members[0].model, opened.members[0].model.recipe.text
    if cfg.compare or cfg.attribution != "integrated_gradients" or spec.tokenizer != "hf":
        raise UserError(f"checkpoint={cfg.checkpoint!r} is a text model ({spec.describe()}): explain gives it "
                        "integrated gradients per token of an encoder (minilm, hf), without compare=. Use "
                        "method=integrated_gradients and leave compare out.")
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, spec.source)
    if cfg.input is None:
        prepared = prepare_splits(opened.splits, spec, opened.data, lambda _: None)
        ids, labels = zip(*sample_loader(prepared.split(cfg.split), spec, opened.data, device, cfg.samples, cfg.seed),
                          strict=True)
        ids = torch.cat(ids)
        table = pd.DataFrame({"sample": [f"{cfg.split}[{i}]" for i in range(len(ids))],
                              "true": [opened.splits.classes[int(y)] for y in torch.cat(labels)]})
    else:
        texts = [t for t in read_texts(str(cfg.input)) if t.strip()]
        ids, table = encode(spec, texts), pd.DataFrame({"sample": texts})
    ids, pad, classes = ids.to(device), tokenizer.pad_token_id or 0, model.recipe.classes
    with torch.no_grad():
        probs = model(ids).softmax(1)
    predicted = probs.argmax(1)
    scores, gap = attribution.token_attributions(model, ids, predicted, pad, cfg.steps)
    chance, _ = attribution.token_attributions(attribution.randomised_copy(model, cfg.seed), ids, predicted, pad, cfg.steps)
    real = [row != PAD for row in ids]
    tokens = [tokenizer.convert_ids_to_tokens(row[keep].tolist()) for row, keep in zip(ids, real, strict=True)]
    values = [score[keep].cpu() for score, keep in zip(scores, real, strict=True)]
    table["predicted"] = [classes[int(i)] for i in predicted]
    table["probability"] = probs.gather(1, predicted[:, None])[:, 0].cpu().numpy()
    table["top_tokens"] = [" ".join(w[i] for i in v.topk(min(5, len(v))).indices) for w, v in zip(tokens, values, strict=True)]
    table["completeness_gap"] = gap.cpu().numpy()
    table["sanity_spearman"] = attribution.rank_correlation(values, [c[k].cpu() for c, k in zip(chance, real, strict=True)])
    kept = attribution.after_token_deletion(model, ids, scores, pad, 0.2).gather(1, predicted[:, None])[:, 0]
    table["probability_after_top20"] = kept.cpu().numpy()
    write_table(table, out_dir / "explain.csv")
    write_table(pd.DataFrame([{"sample": s, "position": i, "token": w, "attribution": float(v)}
                              for s, words, vals in zip(table["sample"], tokens, values, strict=True)
                              for i, (w, v) in enumerate(zip(words, vals, strict=True))]), out_dir / "tokens.csv",
                markdown=False)
    write_token_html(out_dir / "explain.html", [f"{r.sample}: predicted {r.predicted} ({r.probability:.2f})"
                                                + (f", true {r.true}" if "true" in table else "") for r in table.itertuples()],
                     tokens, [v.tolist() for v in values], "Integrated gradients of each token's embedding for the "
                     "predicted class (green: for it, red: against it), from the padding token as baseline.")
    console.print(rich_table(table.drop(columns=["sample"]).head(GRID_ROWS), title=f"{len(table)} text(s) explained -> "
                             f"{out_dir}/explain.html, explain.csv, tokens.csv"))
    return table


def _file_samples(cfg: DictConfig, model: Classifier) -> Samples:
    paths = find_inputs(str(cfg.input))
    images, rows, failed = [], [], []
    for good, pixels, problems in decoded_chunks(paths, model.recipe.input):
        images.append(pixels)
        rows += [{"sample": str(paths[i])} for i in good]
        failed += [{"sample": str(paths[i]), "error": problem} for i, problem in problems.items()]
    return Samples(torch.cat(images) if images else torch.empty(0, dtype=torch.uint8), rows, failed)


def _explain(cfg: DictConfig, models: list[Classifier], x: torch.Tensor, samples: Samples,
             classes: list[str]) -> tuple[pd.DataFrame, list[torch.Tensor]]:
    """One row per sample (prediction, attribution statistics, sanity and deletion figures), and the maps
    of each model."""
    model = models[0]
    with torch.no_grad():
        probs = model(x).softmax(1)
    predicted = probs.argmax(1)
    maps = [attribution.attribute(m, x, predicted, cfg.attribution, cfg.steps, cfg.window) for m in models]
    random_maps = attribution.attribute(attribution.randomised_copy(model, cfg.seed), x, predicted, cfg.attribution,
                                        cfg.steps, cfg.window)
    table = pd.DataFrame(samples.rows)
    table["predicted"] = [classes[int(i)] for i in predicted]
    table["probability"] = probs.gather(1, predicted[:, None])[:, 0].cpu().numpy()
    table["top10_share"] = attribution.top_share(maps[0])
    table["sanity_spearman"] = attribution.rank_correlation(maps[0], random_maps)
    order = attribution.most_attributed_first(maps[0])
    for fraction in (0.1, 0.2):
        left = attribution.after_deletion(model, x, order, fraction).gather(1, predicted[:, None])[:, 0]
        table[f"probability_after_top{round(100 * fraction)}"] = left.cpu().numpy()
    if len(models) > 1:
        with torch.no_grad():
            table["predicted_compare"] = [classes[int(i)] for i in models[1](x).argmax(1)]
        table["compare_spearman"] = attribution.rank_correlation(maps[0], maps[1])
    table["error"] = ""
    table = pd.concat([table, pd.DataFrame(samples.failed)], ignore_index=True)
    curve = pd.DataFrame(attribution.deletion_curve(model, x, maps[0], predicted, DELETION, cfg.seed))
    table.attrs["deletion"] = curve
    return table, maps


def _write(cfg: DictConfig, out_dir: Path, samples: Samples, table: pd.DataFrame, maps: list[torch.Tensor],
           console: Console) -> None:
    import matplotlib.pyplot as plt

    rgb = samples.images.expand(-1, 3, -1, -1) if samples.images.shape[1] == 1 else samples.images
    images = rgb.permute(0, 2, 3, 1).numpy()
    heat = [m.cpu().numpy() for m in maps]
    pictures = out_dir / "explain"
    pictures.mkdir(parents=True, exist_ok=True)
    explained = table[table["error"] == ""].reset_index(drop=True)
    scale = max(1, 128 // images.shape[1])  # small inputs (8 px digits) enlarged, pixels kept square
    for i in range(len(explained)):
        picture = overlay(images[i], heat[0][i]).repeat(scale, axis=0).repeat(scale, axis=1)
        atomic_write(pictures / f"{i:03d}.png", lambda tmp, p=picture: plt.imsave(tmp, p, format="png"))
    titles = [f"{r['sample']}\npredicted {r['predicted']} ({r['probability']:.2f})"
              + (f", true {r['true']}" if "true" in r and isinstance(r["true"], str) else "")
              for _, r in explained.head(GRID_ROWS).iterrows()]
    shown = slice(0, GRID_ROWS)
    plot_explanations(images[shown], heat[0][shown], titles, out_dir / "explain.png",
                      heat[1][shown] if len(heat) > 1 else None)
    write_table(table, out_dir / "explain.csv")
    curve = table.attrs["deletion"]
    write_table(curve, out_dir / "deletion.csv", markdown=True)
    console.print(rich_table(curve, title=f"deletion curve ({cfg.attribution}): the prediction kept as the most "
                                          "attributed pixels are removed, against random pixels"))
    sanity = float(np.nanmean(explained["sanity_spearman"]))
    console.print(f"{len(explained)} sample(s) explained by {cfg.attribution} -> {out_dir}/explain.png, explain.csv; "
                  f"sanity check: rank correlation with a randomised-weights copy {sanity:.2f} "
                  "(near 1: the map does not depend on what the model learned)", highlight=False)
