"""Device choice, mixed precision and reproducibility settings."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from transfer_cli.errors import UserError

# trainer.precision -> autocast dtype (None: plain float32)
AMP_DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[name]:
        usable = [d for d, ok in available.items() if ok]
        raise UserError(f"trainer.device={name} is not available on this machine. Available: auto, {', '.join(usable)}.")
    return torch.device(name)


@dataclass
class Precision:
    """torch.autocast for the forward pass and a GradScaler (active only for fp16) for the backward."""

    name: str
    device: torch.device

    def __post_init__(self) -> None:
        self.dtype = AMP_DTYPES[self.name]
        # fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.name == "16-mixed" and self.device.type == "cuda")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors, and tuples/lists of them, moved to ``device`` (without blocking when pinned)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one random stream of a run: a function of the run's seed and the stream's name only, so
    what ran earlier in the process (a source model built or read from its cache, another sweep job)
    cannot shift it."""
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_stage(seed: int, stage: str) -> None:
    """Seed Python's, NumPy's and torch's global generators (every device) for ``stage`` of a run seeded
    with ``seed``: model initialisation, the training loop's dropout and augmentation draws, ..."""
    value = stage_seed(seed, stage)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def deterministic_algorithms(deterministic: bool) -> None:
    """``trainer.deterministic`` for this process, set both ways: a run after a deterministic one in the same
    process (tests, notebooks, sweeps run in-process) gets the fast kernels back."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic and torch.cuda.is_available()


def configure_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
