"""Checkpoint files: safetensors weights plus a JSON sidecar that says how to rebuild the model.

Every write goes to a temporary file in the same folder and is renamed into place, so a kill
mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from transfer_cli.errors import UserError

FORMAT_VERSION = 1


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def sidecar_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """``state`` (a model's state_dict) as safetensors at ``path``, ``meta`` as the JSON sidecar."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(sidecar_path(path), json.dumps({"format": FORMAT_VERSION, **meta}, indent=2, default=str))


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights = Path(path).expanduser()
    sidecar = sidecar_path(weights)
    if not weights.is_file():
        raise UserError(f"checkpoint={path!r}: no such file. Pass a .safetensors file written by `transfer train` "
                        "(run_dir/checkpoints/best.safetensors or last.safetensors).")
    if not sidecar.is_file():
        raise UserError(f"checkpoint={path!r} has no sidecar {sidecar.name} beside it, which says how to rebuild "
                        "the model. Keep the .json file that `transfer train` wrote next to the weights.")
    meta = json.loads(sidecar.read_text())
    try:
        state = load_file(str(weights))
    except Exception as err:  # noqa: BLE001 - a corrupt file is the user's input problem
        raise UserError(f"checkpoint={path!r} could not be read as safetensors: {err}") from None
    return state, meta


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise UserError(
            f"checkpoint={path!r} does not fit the architecture its sidecar describes: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} with "
            f"another shape (e.g. {wrong[:3]}). Was the sidecar edited or copied from another run?"
        )
    model.load_state_dict(state)
