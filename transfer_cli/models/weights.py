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


def load_weights_file(model: nn.Module, path: str, name: str) -> tuple[list[str], set[str]]:
    """Load what fits and refuse a file that matches nothing; returns lines saying what did not fit, and the
    keys of ``model`` that were loaded. A checkpoint this tool wrote loads its body and, when its head is one
    linear layer, that head as the network's classifier (with the checkpoint's classes)."""
    state = read_state_dict(path)
    if _written_by_this_tool(state):
        state = _as_network(state, model)
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
    return notes, set(fits)


def last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The network's classifier: its last Linear layer (path, module), or None."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _written_by_this_tool(state: dict[str, torch.Tensor]) -> bool:
    """A Classifier's state dict: body.*, head.* and the input adapter's input.*."""
    prefixes = {k.split(".", 1)[0] for k in state}
    return "body" in prefixes and "head" in prefixes and prefixes <= {"body", "head", "input"}


def _as_network(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint's body under the network's own keys, plus its head as the network's classifier when the
    head is one linear layer over the same features (an MLP head has no place in the network)."""
    network = {k.removeprefix("body."): v for k, v in state.items() if k.startswith("body.")}
    head_layers = {k.rsplit(".", 1)[0] for k in state if k.startswith("head.") and k.endswith(".weight")}
    found = last_linear(model)
    if len(head_layers) != 1 or found is None:
        return network
    (layer,), (path, classifier) = head_layers, found
    weight, bias = state[f"{layer}.weight"], state.get(f"{layer}.bias")
    if weight.ndim != 2 or weight.shape[1] != classifier.in_features or bias is None:
        return network
    if weight.shape[0] != classifier.out_features:  # the checkpoint's own classes
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr,
                nn.Linear(classifier.in_features, weight.shape[0]))
    network[f"{path}.weight"], network[f"{path}.bias"] = weight, bias
    return network


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
    if isinstance(stated, dict) and isinstance(stated.get("recipe"), dict):  # a checkpoint's sidecar: its normalisation
        trained_on = stated["recipe"].get("input") or {}
        stated = {"mean": trained_on.get("mean"), "std": trained_on.get("std")}
    found = {k: stated[k] for k in PREPROCESS_KEYS if isinstance(stated, dict) and stated.get(k) is not None}
    if found.get("interpolation", "bilinear") not in INTERPOLATIONS:
        raise UserError(f"{path} (the sidecar of backbone.weights={weights!r}) states interpolation="
                        f"{found['interpolation']!r}. Allowed: {', '.join(INTERPOLATIONS)}.")
    return found or None
