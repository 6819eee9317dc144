"""LoRA (Hu et al. 2022) through Hugging Face peft: low-rank updates next to frozen pretrained layers.

peft is an optional extra (``pip install 'transfer_cli[peft]'``): it pulls in transformers and accelerate.
Checkpoints hold the plain Classifier with every update merged (W + B A * alpha / rank), so evaluating,
ensembling, fusing or exporting a LoRA run needs neither peft nor any LoRA code.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from transfer_cli.errors import UserError
from transfer_cli.methods.base import METHODS, Method
from transfer_cli.methods.finetune import BNMode
from transfer_cli.models.backbone import Classifier
from transfer_cli.registry import Count, Fraction, Positive

ADAPTER = "default"  # peft's name for the one adapter a run trains


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise UserError("method=lora needs the peft package, an optional extra: pip install 'transfer_cli[peft]' "
                        "(make install installs it).") from None
    return peft


def auto_targets(body: nn.Module) -> list[str]:
    """Every linear layer (attention qkv/proj and MLPs of transformers, the fully connected layers of
    small nets) and every ungrouped 1x1 convolution (the channel mixing of ResNet bottlenecks and
    MobileNet/EfficientNet inverted residuals); a body with neither (a plain small CNN): every
    ungrouped convolution."""
    def ungrouped_conv(m: nn.Module) -> bool:
        return isinstance(m, nn.Conv2d) and m.groups == 1

    chosen = [name for name, m in body.named_modules()
              if isinstance(m, nn.Linear) or (ungrouped_conv(m) and m.kernel_size == (1, 1))]
    return chosen or [name for name, m in body.named_modules() if ungrouped_conv(m)]


def _matching(body: nn.Module, pattern: str | list[str]) -> list[str]:
    """Module names of ``body`` that ``pattern`` selects: a regex matched against the whole name, or a
    list of names / name suffixes (``qkv`` selects ``blocks.0.attn.qkv``)."""
    names = [name for name, _ in body.named_modules() if name]
    if isinstance(pattern, str):
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise UserError(f"method.target_modules={pattern!r} is not a valid regular expression ({err}).") from None
        return [n for n in names if regex.fullmatch(n)]
    return [n for n in names if any(n == p or n.endswith("." + p) for p in pattern)]


@METHODS.register("lora")
class LoRA(Method):
    """The backbone frozen; trainable rank-``rank`` updates (scaled by ``alpha / rank``) on the
    ``target_modules`` (``auto``: see ``auto_targets``); the head trains fully. ``bn``: running
    statistics as finetune (auto: fixed for folded-BN weights)."""

    def __init__(self, model: Classifier, *, rank: Count, alpha: Positive, dropout: Fraction,
                 target_modules: str | list[str], bn: BNMode, label_smoothing: Fraction) -> None:
        super().__init__(model, label_smoothing)
        peft = _peft()
        targets = auto_targets(model.body) if target_modules == "auto" else _matching(model.body, target_modules)
        if not targets:
            raise UserError(
                f"method.target_modules={target_modules!r} selects no layer of backbone={model.backbone_name}. "
                "Use auto (every linear layer and 1x1 convolution), a list of module names or name suffixes "
                "(e.g. [qkv, proj]), or a regular expression matched against whole module names."
            )
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        try:
            peft.inject_adapter_in_model(config, model.body)
        except (ValueError, TypeError) as err:  # e.g. a selected module of a type LoRA does not support
            raise UserError(f"method.target_modules={target_modules!r}: peft cannot put LoRA on the selected "
                            f"layers of backbone={model.backbone_name}: {err}") from None
        for name, param in model.body.named_parameters():
            param.requires_grad_(".lora_" in name)
        self.targets = targets
        self.apply_bn_mode(bn)

    def plain_state(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The plain Classifier's weights: each adapted layer's update merged into its weight."""
        model = model or self.model
        lora_layer = _peft().tuners.lora.LoraLayer
        state = {}
        for key, value in model.state_dict().items():
            if ".lora_" not in key:
                state[key.replace(".base_layer.", ".")] = value.detach().to("cpu", copy=True)
        with torch.no_grad():
            for name, layer in model.named_modules():
                if isinstance(layer, lora_layer):
                    state[f"{name}.weight"] += layer.get_delta_weight(ADAPTER).detach().cpu()
        return state

    def load_plain_state(self, state: dict[str, torch.Tensor]) -> None:
        """Merged weights into the adapted model: the bases take them and every update restarts at zero
        (B = 0), so the model computes exactly the merged function."""
        adapted = {}
        for key, value in self.model.state_dict().items():
            if ".lora_B." in key:
                adapted[key] = torch.zeros_like(value)
            elif ".lora_" in key:
                adapted[key] = value
            else:
                adapted[key] = state[key.replace(".base_layer.", ".")]
        self.model.load_state_dict(adapted)

    def describe(self) -> dict:
        return {**super().describe(), "lora_layers": len(self.targets)}
