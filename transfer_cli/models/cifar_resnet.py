"""The CIFAR ResNets of He et al. (2015), depth 6n+2, with the parameter-free "option A" shortcut.

Key names follow the widely shared CIFAR-10 checkpoints (conv1/bn1, layer1..3, linear), so those
files load with ``backbone.weights=PATH`` (a ``module.`` prefix and a ``state_dict`` wrapper are handled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transfer_cli.data.transforms import WeightsMeta
from transfer_cli.models.backbone import BACKBONES, Backbone, backbone_from_classifier

# The published CIFAR-10 checkpoints were trained on 32x32 input normalised with ImageNet statistics.
CIFAR_WEIGHTS_META = WeightsMeta(crop=32, resize=32, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.subsample = stride != 1 or cin != cout
        self.pad = (cout - cin) // 2

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.subsample:
            return x
        # Option A: every second pixel, zero channels added equally before and after.
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build_cifar_resnet(depth: int, weights: str = "none") -> Backbone:
    return backbone_from_classifier(f"cifar_resnet{depth}", CifarResNet(depth), weights,
                                    [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"]], channels=3, min_size=8,
                                    weights_meta=CIFAR_WEIGHTS_META if weights != "none" else None)


def _register(depth: int) -> None:
    BACKBONES.add(f"cifar_resnet{depth}", lambda weights="none": build_cifar_resnet(depth, weights))


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
