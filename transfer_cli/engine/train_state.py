"""The resumable state of a run: everything that decides what the next step computes.

Saved atomically next to the checkpoints (``train_state.pt``) at the checkpoint cadence, always at an
epoch boundary, and loaded with ``weights_only=True`` (no pickle). A run killed anywhere after the first
save resumes from the last epoch boundary and, on a deterministic CPU run, finishes with the same
weights and metrics as a run that was never stopped: model, optimizer, schedule, grad scaler, epoch,
step, metrics rows, best epoch (its weights are best.safetensors), the data's identity, every RNG (torch, CUDA, NumPy, Python, each loader's
shuffling generator and where the endless target iterator of a domain-adaptation run stands) and the
method's own state (e.g. stages unfrozen so far) and every hook's own state (an EMA / SWA average, whether a
best checkpoint exists) are all in it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer_cli.engine.loop import Hook, State
from transfer_cli.errors import UserError
from transfer_cli.files import atomic_write

VERSION = 2  # 2: hooks keep their own state (1 kept the weight average alone)


def rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def loader_state(loader: Any) -> dict[str, Any]:
    """Where a training loader stands: its own ``state_dict`` (paired loaders) or its shuffling generator."""
    if hasattr(loader, "state_dict"):
        return loader.state_dict()
    generator = getattr(loader, "generator", None)
    return {"generator": generator.get_state()} if generator is not None else {}


def load_loader_state(loader: Any, saved: dict[str, Any]) -> None:
    if hasattr(loader, "load_state_dict"):
        loader.load_state_dict(saved)
    elif saved.get("generator") is not None:
        loader.generator.set_state(saved["generator"])


def _hook_states(hooks: Sequence[Hook]) -> dict[str, Any]:
    """Each stateful hook's state, by its class name (a run has at most one hook of a stateful kind)."""
    states = {type(hook).__name__: hook.state_dict() for hook in hooks}
    return {name: saved for name, saved in states.items() if saved is not None}


def capture(state: State, loader: Any, scaler: Any, data: str, hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """The state after the epoch ``state.epoch`` finished. The best weights are not in it: the checkpointer
    writes best.safetensors just before, and reads them back from there on resume. ``data`` is the data's
    identity (data/identity.py), so a run never resumes on changed data."""
    return {
        "version": VERSION,
        "data": data,
        "next_epoch": state.epoch + 1,
        "step": state.step,
        "history": state.history,
        "best": state.best,
        "last_loss": state.last_loss,
        "method": state.method.state_dict(),
        "method_extra": state.method.extra_state(),
        "optimizer": state.optimizer.state_dict() if state.optimizer else None,
        "scheduler": state.scheduler.state_dict() if state.scheduler else None,
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "loader": loader_state(loader),
        "rng": rng_states(),
        "hooks": _hook_states(hooks),
    }


def save(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load(path: Path) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("version") != VERSION:
        raise UserError(f"{path} holds a training state of format {payload.get('version')}, and this version of "
                        f"transfer_cli resumes format {VERSION} only: finish it with the version that started it, "
                        "or start a new run.")
    return payload


def restore(state: State, payload: dict[str, Any], loader: Any, scaler: Any, hooks: Sequence[Hook] = (),
            rank: int = 0, world: int = 1) -> None:
    """Put ``payload`` back into a freshly built run (process ``rank`` of ``world`` gets its own RNG states)."""
    saved = payload["hooks"]
    if set(saved) != set(_hook_states(hooks)):
        raise ValueError(f"the saved run's stateful hooks ({sorted(saved)}) differ from this run's "
                         f"({sorted(_hook_states(hooks))}): its trainer settings changed")
    for hook in hooks:
        if type(hook).__name__ in saved:
            hook.load_state_dict(saved[type(hook).__name__])
    state.method.load_extra_state(payload["method_extra"], state)  # first: it may add optimizer groups
    state.method.load_state_dict(payload["method"])
    if state.optimizer is not None:
        state.optimizer.load_state_dict(payload["optimizer"])
    if state.scheduler is not None:
        state.scheduler.load_state_dict(payload["scheduler"])
    if payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    state.epoch, state.step = payload["next_epoch"], payload["step"]
    state.history, state.best, state.last_loss = payload["history"], payload["best"], payload["last_loss"]
    load_loader_state(loader, payload["loader"])
    per_process = payload.get("rng_per_process") or []
    set_rng_states(per_process[rank] if len(per_process) == world else payload["rng"])
