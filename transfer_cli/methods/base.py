"""The interface between a transfer method and the generic training loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from transfer_cli.errors import UserError
from transfer_cli.models.backbone import Classifier
from transfer_cli.models.stages import describe_stage
from transfer_cli.registry import Registry

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

LoaderFactory = Callable[[str, bool], DataLoader]  # (split, train) -> loader; train: shuffled and augmented

# name -> Method subclass, built as cls(model, **cfg)
METHODS = Registry("method")


@dataclass
class DataContext:
    """What a method may need to prepare its data: where to compute, and what identifies the data."""

    device: torch.device
    precision: Any
    # per split: what identifies its model input (its samples' digest and the preprocessing), for cache keys
    identity: dict[str, dict[str, Any]] = field(default_factory=dict)
    target: LoaderFactory | None = None  # the unlabelled target domain, when the run has one


# ``backbone_lr_mult=auto``: a body with weights from elsewhere (ImageNet, timm, a local file) trains at a tenth
# of the head's rate, so the first steps of a random head do not tear its features apart (fine-tuned ImageNet
# MobileNetV2 on USPS 20-shot at AdamW 2e-3: 18 % at 1x, 89 % at 0.1x). A random body, and a source body this
# tool pretrained with the same optimizer on nearby data, train at the head's rate (the default digits 0-4 ->
# 5-9 transfer: 87.6 % at 1x, 73.0 % at 0.1x over 3 seeds).
PRETRAINED_BACKBONE_LR_MULT = 0.1


def backbone_lr_for(model: Classifier) -> float:
    """What ``backbone_lr_mult=auto`` means for ``model``."""
    return 1.0 if model.recipe.weights in ("none", "source") else PRETRAINED_BACKBONE_LR_MULT


class Method(nn.Module):
    """Wraps a Classifier; owns which parameters train, the loss, and any hooks it needs.

    The pipeline only calls ``loaders``, ``param_groups``, ``training_step``, ``predict``, ``hooks``
    and ``train``; it never asks which method it runs.
    """

    # True: training_step updates the parameters itself (e.g. full-batch L-BFGS); the loop then
    # does no backward pass, optimizer step or schedule.
    manual_optimization = False
    # True: the method trains on (source batch, unlabelled target batch) pairs and needs a target= domain.
    needs_target_data = False
    # False: only the head trains, on features of a fixed body (which may then have no trainable weights).
    trains_body = True
    # False: every layer is re-initialised, so pretrained weights (a source model) would be thrown away.
    uses_pretrained_weights = True
    # Epochs (0-based) before this one are never kept as the best checkpoint (SHOT's source-only phase).
    selectable_from = 0

    def __init__(self, model: Classifier, label_smoothing: float = 0.0, layer_decay: float = 1.0,
                 backbone_lr_mult: float | str = 1.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.layer_decay = layer_decay
        self.backbone_lr_mult = backbone_lr_for(model) if backbone_lr_mult == "auto" else float(backbone_lr_mult)
        self.frozen_norms: list[nn.Module] = []
        self.base_lr, self.weight_decay = 0.0, 0.0

    # -- freezing -----------------------------------------------------------------------------
    def freeze_stages(self, depth: int | str, key: str = "method.freeze") -> int:
        """Freeze the first ``depth`` stages (``all``: every stage; the head never freezes)."""
        stages = self.model.stages
        count = len(stages) if depth == "all" else depth
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= len(stages):
            names = ", ".join(f"{i + 1}={describe_stage(s)}" for i, s in enumerate(stages))
            raise UserError(
                f"{key}={depth!r} is out of range: backbone={self.model.backbone_name} has {len(stages)} "
                f"stages ({names}). Allowed: 0..{len(stages)} or all."
            )
        for index in range(count):
            for p in self.model.stage_parameters(index):
                p.requires_grad_(False)
            self.frozen_norms += [m for m in self.model.stage_modules(index) if isinstance(m, _NORMS)]
        return count

    def has_folded_norms(self) -> bool:
        """True when the body's BatchNorm layers carry identity statistics (mean 0, var ~1) but a learned
        shift: weights whose BatchNorm was folded into the convolutions (e.g. dequantized models).
        Training such BN in train mode would replace the folded affine map by batch statistics."""
        norms = [m for m in self.model.body.modules() if isinstance(m, _NORMS) and m.running_mean is not None]
        return bool(norms) and all(
            torch.all(m.running_mean == 0) and torch.allclose(m.running_var, torch.ones_like(m.running_var), atol=1e-4)
            for m in norms
        ) and any(m.bias is not None and bool(m.bias.detach().abs().sum() > 0) for m in norms)

    def apply_bn_mode(self, bn: str) -> None:
        """``frozen``: BN fixed; ``train``: BN trains; ``auto``: frozen only for folded-BN weights."""
        if bn == "frozen" or (bn == "auto" and self.has_folded_norms()):
            self.freeze_norms()

    def freeze_norms(self) -> None:
        """BatchNorm as a fixed affine map: running statistics and affine parameters stay as loaded."""
        for m in self.model.body.modules():
            if isinstance(m, _NORMS):
                m.requires_grad_(False)
                self.frozen_norms.append(m)

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for m in self.frozen_norms:  # frozen statistics must not drift with the batches seen
            m.eval()
        return self

    # -- what the pipeline calls ---------------------------------------------------------------
    def loaders(self, make: LoaderFactory, context: DataContext) -> dict[str, DataLoader]:
        """The loaders to train, validate and test on. Methods that train on something other than
        augmented images (cached features, paired domains) override this."""
        return {"train": make("train", True), "val": make("val", False), "test": make("test", False)}

    def lr_scale(self) -> dict[int, float]:
        """Learning-rate multiplier per parameter: stage i of n gets backbone_lr_mult * layer_decay**(n - i),
        so the stage next to the head gets one factor of layer_decay; the head gets 1."""
        n = len(self.model.stages)
        scales = {}
        for index in range(n):
            scale = self.backbone_lr_mult * self.layer_decay ** (n - index)
            scales.update({id(p): scale for p in self.model.stage_parameters(index)})
        return scales

    def param_groups(self, lr: float, weight_decay: float,
                     params: Iterable[nn.Parameter] | None = None) -> list[dict[str, Any]]:
        """Trainable parameters (or ``params``) grouped by learning-rate scale; biases and norm weights
        get no weight decay."""
        self.base_lr, self.weight_decay = lr, weight_decay
        scales = self.lr_scale()
        chosen = [p for p in self.model.parameters() if p.requires_grad] if params is None else list(params)
        groups: dict[tuple[float, bool], dict[str, Any]] = {}
        for p in chosen:
            scale, decay = scales.get(id(p), 1.0), p.ndim > 1
            group = groups.setdefault((scale, decay), {"params": [], "lr": lr * scale,
                                                       "weight_decay": weight_decay if decay else 0.0})
            group["params"].append(p)
        return list(groups.values())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns ``loss`` (what is optimised), ``logits`` and ``labels`` (for train accuracy),
        and optionally more ``loss_*`` terms to log."""
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits.detach(), "labels": y}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def hooks(self) -> list:
        return []

    def plain_state(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """CPU copies of the weights of ``model`` (default: the model training) as the plain Classifier
        holds them: what checkpoints store. Methods that change the model's structure (LoRA) convert here."""
        return {k: v.detach().to("cpu", copy=True) for k, v in (model or self.model).state_dict().items()}

    def load_plain_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put checkpoint weights (``plain_state``'s form) back into the model training."""
        self.model.load_state_dict(state)

    def extra_state(self) -> dict[str, Any]:
        """What a resumed run needs besides the parameters and buffers (tensors, numbers, lists, dicts)."""
        return {}

    def load_extra_state(self, saved: dict[str, Any], state: Any) -> None:
        """Bring a freshly built method to ``saved``, before its state_dict and the optimizer's are loaded;
        ``state`` is the loop State (optimizer and schedule included)."""

    def describe(self) -> dict[str, Any]:
        """Facts about the trainable setup for the run summary."""
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"params_total": total, "params_trainable": trainable, "backbone_lr_mult": self.backbone_lr_mult}
