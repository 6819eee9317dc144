"""Batched input preparation that lives in the model, so checkpoints carry their own preprocessing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transfer_cli.data.transforms import InputSpec

_LUMA = (0.299, 0.587, 0.114)


class InputAdapter(nn.Module):
    """uint8 (or [0, 1] float) images -> normalised float of the size and channels the backbone takes."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.channels, self.size = spec.channels, spec.size
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1))
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif x.shape[1] == 3 and self.channels == 1:
                x = (x * self.luma).sum(1, keepdim=True)
            else:
                raise ValueError(f"cannot adapt {x.shape[1]}-channel input to {self.channels} channels")
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std
