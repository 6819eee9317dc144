"""Loading weights from local files: safetensors or torch state dicts, reported key by key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from transfer_cli.data.transforms import INTERPOLATIONS
from transfer_cli.errors import UserError


def looks_like_path(value: str) -> bool:
    return "/" in value or Path(value).suffix in (".safetensors", ".pt", ".pth", ".th", ".bin")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"backbone.weights={path!r}: no such file. Give a .safetensors or torch state-dict file, "
                        "a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...) or none.")
    try:
        if file.suffix == ".safetensors":
            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UserError(f"backbone.weights={path!r} could not be read as safetensors or a torch state dict: {err}") from None
    for wrapper in ("state_dict", "model"):  # training scripts often save {"state_dict": ..., "epoch": ...}
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise UserError(f"backbone.weights={path!r} holds a {type(state).__name__}, not a state dict.")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_weights_file(model: nn.Module, path: str, name: str) -> list[str]:
    """Load what fits and refuse a file that matches nothing; returns lines saying what did not fit."""
    state = read_state_dict(path)
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if not fits:
        raise UserError(
            f"backbone.weights={path!r} does not match backbone={name}: none of its {len(state)} tensors "
            f"fit (its keys start {list(state)[:3]}, the model's {list(own)[:3]}). Is it for another architecture?"
        )
    model.load_state_dict(fits, strict=False)
    notes = [f"loaded {len(fits)}/{len(own)} tensors from {path}"]
    for label, keys in (("shape differs, kept initial", wrong_shape), ("not in the model", unexpected),
                        ("not in the file, kept initial", missing)):
        if keys:
            notes.append(f"  {len(keys)} {label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
    return notes


PREPROCESS_KEYS = ("resize", "crop", "interpolation", "mean", "std")


def weights_sidecar(weights: str) -> dict[str, Any] | None:
    """The preprocessing a JSON file next to a local weights file states (``<stem>.json`` with any of
    resize, crop, interpolation, mean, std at its top level); None when there is none."""
    if not looks_like_path(weights):
        return None
    path = Path(weights).expanduser().with_suffix(".json")
    if not path.is_file():
        return None
    try:
        stated = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} (the sidecar of backbone.weights={weights!r}) is not valid JSON: {err}.") from None
    found = {k: stated[k] for k in PREPROCESS_KEYS if isinstance(stated, dict) and stated.get(k) is not None}
    if found.get("interpolation", "bilinear") not in INTERPOLATIONS:
        raise UserError(f"{path} (the sidecar of backbone.weights={weights!r}) states interpolation="
                        f"{found['interpolation']!r}. Allowed: {', '.join(INTERPOLATIONS)}.")
    return found or None
