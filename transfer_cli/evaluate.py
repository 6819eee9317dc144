"""`transfer eval`: rebuild models from checkpoint sidecars and measure them (or their ensemble) on a split."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from rich.console import Console
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from transfer_cli.config import SPLITS
from transfer_cli.engine.averaging import recompute_norm_statistics
from transfer_cli.engine.device import Precision, resolve_device
from transfer_cli.engine.loop import infer
from transfer_cli.engine.metrics import logit_metrics
from transfer_cli.errors import UserError, bad_value
from transfer_cli.models.backbone import Classifier
from transfer_cli.models.checkpoint import checkpoint_paths, save_model
from transfer_cli.models.ensemble import ENSEMBLES, check_ensemble
from transfer_cli.models.fusion import WEIGHT_FUSIONS
from transfer_cli.reporting.plots import plot_confusion, plot_wise
from transfer_cli.reporting.progress import plain_log
from transfer_cli.reporting.tables import rich_table, write_table
from transfer_cli.scoring import HELD_OUT, Member, Opened, open_checkpoints


def _scores(log_probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, float]:
    truth, predicted = labels.numpy(), log_probs.argmax(1).numpy()
    macro = f1_score(truth, predicted, labels=np.arange(len(classes)), average="macro", zero_division=0)
    return {**logit_metrics(log_probs, labels), "macro_f1": 100.0 * macro, "n": len(truth)}


def member_labels(members: list[Member]) -> list[str]:
    """Short names for tables: method and seed from each sidecar's run config, else the run folder."""
    labels = []
    for m in members:
        method = m.trained("method").get("name")
        labels.append(f"{method} seed={m.trained().get('seed')}" if method else "/".join(Path(m.path).parts[-4:-2]))
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


def run_eval(cfg: DictConfig, out_dir: Path, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    if cfg.split not in SPLITS:
        raise bad_value("split", cfg.split, SPLITS)

    log = plain_log(console)

    paths = checkpoint_paths(cfg.checkpoint, log)
    fusion = cfg.fusion.name
    if fusion != "none":
        WEIGHT_FUSIONS.get(fusion)
        alphas = check_fusion(cfg, len(paths))
    else:
        weights = check_ensemble(cfg.ensemble, len(paths))

    scored = {cfg.split} | ({"val"} if fusion != "none" else set())  # fusion rules choose on val
    opened = open_checkpoints(paths, scored, cfg.dataset, cfg.dataset_changes, log)
    members, splits, data_cfg, order = opened.members, opened.splits, opened.data, opened.order
    device = resolve_device(cfg.device)
    precision = Precision(str(cfg.precision), device)

    def predict(model: Classifier, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        logits, labels = infer(model.to(device).eval(), loader, device, precision)
        return (logits if order is None else logits[:, order]).log_softmax(1), labels

    if fusion != "none":
        table, final, labels = _fuse(cfg, opened, alphas, predict, device, precision, out_dir, log)
        title = f"{fusion} on {data_cfg.name} {cfg.split}"
    else:
        log_probs, rows = [], []
        for member in members:  # each member sees the data through its own preprocessing
            member_log_probs, labels = predict(member.model, opened.loader(member, cfg.split, device, cfg.batch_size, log))
            log_probs.append(member_log_probs)
            rows.append({"model": member.path, "backbone": member.recipe.backbone,
                         **_scores(member_log_probs, labels, splits.classes)})
        final = log_probs[0]
        if len(members) > 1:
            final = ENSEMBLES.get(cfg.ensemble.name)(torch.stack(log_probs), weights)
            scores = _scores(final, labels, splits.classes)
            if cfg.ensemble.name == "vote":
                scores["loss"] = float("nan")  # votes are not probabilities
            rows.append({"model": f"ensemble ({cfg.ensemble.name})",
                         "backbone": "+".join(m.recipe.backbone for m in members), **scores})
        table = pd.DataFrame(rows)
        title = f"eval on {data_cfg.name} {cfg.split}"
    return _report(table, final, labels, splits.classes, data_cfg.name, cfg.split, len(members) > 1, title,
                   out_dir, console)


def check_fusion(cfg: DictConfig, count: int) -> list[float]:
    """The WiSE-FT mixing coefficients, after checking that the checkpoints suit the fusion rule."""
    name = cfg.fusion.name
    alphas = [float(a) for a in cfg.fusion.alphas]
    if name == "wise":
        if count != 2:
            raise UserError(f"fusion=wise interpolates two checkpoints (checkpoint=[A,B]: A at alpha 0, e.g. the "
                            f"linear probe; B at alpha 1, the fine-tuned model), got {count}.")
        if not alphas or any(not math.isfinite(a) or not 0 <= a <= 1 for a in alphas):
            raise bad_value("fusion.alphas", alphas, "a non-empty list of numbers in [0, 1]")
    elif count < 2:
        raise UserError(f"fusion={name} averages several checkpoints, got {count}: pass checkpoint=[A,B,...] or a "
                        "sweep folder (checkpoint=outputs/sweeps/<time>).")
    return alphas


def _same_architecture(members: list[Member]) -> None:
    first = {k: v for k, v in members[0].recipe.to_dict().items() if k != "weights"}
    for m in members[1:]:
        other = {k: v for k, v in m.recipe.to_dict().items() if k != "weights"}
        if other != first:
            differs = sorted(k for k in first if first[k] != other[k])
            raise UserError(f"checkpoint={m.path!r} differs from {members[0].path!r} in {', '.join(differs)}: "
                            "weight-space fusion needs checkpoints of one architecture with the same input "
                            "preprocessing (e.g. the runs of one sweep over seeds or methods on one backbone).")


def _differing_norms(model: Classifier, states: list[dict[str, torch.Tensor]]) -> list[str]:
    """BatchNorm layers whose running statistics differ between the members: only their statistics need
    measuring again for an average (identical ones, e.g. folded BatchNorm, stay as they are)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            keys = (f"{name}.running_mean", f"{name}.running_var")
            if any(not torch.equal(s[k], states[0][k]) for s in states[1:] for k in keys):
                names.append(name)
    return names


def _fuse(cfg: DictConfig, opened: Opened, alphas: list[float], predict: Any, device: torch.device,
          precision: Precision, out_dir: Path, log: Any) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor]:
    """Score every candidate of the weight-fusion rule on validation and ``cfg.split``; write the chosen
    model as ``fused.safetensors`` (a checkpoint like any other) and, for wise, ``wise.png``."""
    members, splits = opened.members, opened.splits
    _same_architecture(members)
    loader = {split: opened.loader(members[0], split, device, cfg.batch_size, log) for split in {"train", "val", cfg.split}}
    states = [m.model.state_dict() for m in members]
    model = Classifier.from_recipe(members[0].recipe).to(device)
    norms = _differing_norms(model, states) if cfg.fusion.recompute_bn else []
    if norms:
        log(f"fusion.recompute_bn=true: BatchNorm statistics of {len(norms)} layer(s) differ between the checkpoints; "
            f"they are measured again on the {len(splits.train)} training images for every fused model.")

    def load(state: dict[str, torch.Tensor]) -> Classifier:
        model.load_state_dict(state)
        if norms:
            recompute_norm_statistics(model, loader["train"], device, precision, norms)
        return model

    def score(state: dict[str, torch.Tensor]) -> dict[str, float]:
        fused = load(state)
        val = _scores(*predict(fused, loader["val"]), splits.classes)
        return {"val_acc1": val["acc1"], **_scores(*predict(fused, loader[cfg.split]), splits.classes)}

    result = WEIGHT_FUSIONS.get(cfg.fusion.name)(states, member_labels(members), score, alphas)
    table = pd.DataFrame([{"model": c.label, **c.facts, **c.metrics, "chosen": i == result.chosen}
                          for i, c in enumerate(result.candidates)])
    chosen = result.candidates[result.chosen]
    final, labels = predict(load(chosen.state), loader[cfg.split])
    save_model(out_dir / "fused.safetensors", model.state_dict(), members[0].recipe,
               fusion={"name": cfg.fusion.name, "chosen": chosen.label, **chosen.facts,
                       "members": [m.path for m in members]},
               config=members[0].meta.get("config"), **{HELD_OUT: members[0].meta.get(HELD_OUT)})
    if cfg.fusion.name == "wise":
        plot_wise(table, cfg.split, out_dir / "wise.png")
    log(f"chosen on validation: {chosen.label} (val acc1 {chosen.metrics['val_acc1']:.2f}) -> {out_dir / 'fused.safetensors'}")
    return table, final, labels


def _report(table: pd.DataFrame, final: torch.Tensor, labels: torch.Tensor, classes: list[str], dataset: str,
            split: str, combined: bool, title: str, out_dir: Path, console: Console) -> dict[str, Any]:
    """eval.csv, per_class.csv, confusion.csv/png of ``final`` (log-probabilities), and the tables shown."""
    predicted, truth = final.argmax(1).numpy(), labels.numpy()
    every = np.arange(len(classes))
    precision_, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=every, zero_division=0)
    per_class = pd.DataFrame({"class": classes, "precision": 100 * precision_, "recall": 100 * recall,
                              "f1": 100 * f1, "support": support})
    matrix = confusion_matrix(truth, predicted, labels=every)
    confusion = pd.DataFrame(matrix, columns=classes)
    confusion.insert(0, "true", classes)

    table.insert(1, "dataset", dataset)
    table.insert(2, "split", split)
    write_table(table, out_dir / "eval.csv")
    write_table(per_class, out_dir / "per_class.csv")
    write_table(confusion, out_dir / "confusion.csv")
    plot_confusion(matrix, classes, out_dir / "confusion.png")
    # a checkpoint is shown by its run folder (<name>/<time>)
    shown = table.assign(model=["/".join(Path(m).parts[-4:-2]) if m.endswith(".safetensors") else m
                                for m in table["model"]])
    console.print(rich_table(shown.drop(columns=["dataset", "split", "n"]), title=title))
    console.print(rich_table(per_class, title="per class" + (" (combined model)" if combined else "")))
    if len(classes) <= 20:
        console.print(rich_table(confusion, title="confusion (rows: true, columns: predicted)"))
    console.print(f"written to {out_dir}")
    return table.iloc[-1].to_dict() if "chosen" not in table else table[table["chosen"]].iloc[0].to_dict()
