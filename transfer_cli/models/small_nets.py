"""Small networks for digit-scale data that train in seconds on two CPU cores."""

from __future__ import annotations

from torch import nn

from transfer_cli.models.backbone import BACKBONES, Backbone, backbone_from_classifier


def _conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (32-64-128 channels), each halving the resolution, global average
    pooling, one linear classifier. ~94k parameters; about 7.5 MMACs per 28x28 image."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.block1 = _conv_block(in_channels, 32, pool=True)
        self.block2 = _conv_block(32, 64, pool=True)
        self.block3 = _conv_block(64, 128, pool=True)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.block3(self.block2(self.block1(x)))))


class LeNet5(nn.Module):
    """LeNet-5 for 1x32x32 input; submodule names match the common ``convnet.c1 ... fc.f7`` checkpoints."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.convnet = nn.Sequential()
        for name, layer in (("c1", nn.Conv2d(1, 6, 5)), ("relu1", nn.ReLU()), ("s2", nn.MaxPool2d(2)),
                            ("c3", nn.Conv2d(6, 16, 5)), ("relu3", nn.ReLU()), ("s4", nn.MaxPool2d(2)),
                            ("c5", nn.Conv2d(16, 120, 5)), ("relu5", nn.ReLU())):
            self.convnet.add_module(name, layer)
        self.fc = nn.Sequential()
        for name, layer in (("f6", nn.Linear(120, 84)), ("relu6", nn.ReLU()), ("f7", nn.Linear(84, num_classes))):
            self.fc.add_module(name, layer)

    def forward(self, x):
        return self.fc(self.convnet(x).flatten(1))


class LeNetADDA(nn.Module):
    """The Caffe "LeNet" that ADDA (Tzeng et al. 2017) and most digit-adaptation papers use on 28x28
    input: conv 20 - pool - conv 50 - pool - fc 500 - classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, 20, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv2d(20, 50, 5), nn.Dropout2d(0.5), nn.MaxPool2d(2), nn.ReLU(inplace=True))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(800, 500), nn.ReLU(inplace=True), nn.Dropout(0.5))
        self.classifier = nn.Linear(500, num_classes)

    def forward(self, x):
        return self.classifier(self.fc(self.conv2(self.conv1(x))))


@BACKBONES.register("small_cnn")
def small_cnn(weights: str = "none", in_channels: int = 1) -> Backbone:
    return backbone_from_classifier("small_cnn", SmallCNN(in_channels), weights, [["block1"], ["block2"], ["block3"]],
                                    channels=in_channels, min_size=4)


@BACKBONES.register("lenet")
def lenet(weights: str = "none") -> Backbone:
    stages = [["convnet.c1"], ["convnet.c3"], ["convnet.c5"], ["fc.f6"]]
    return backbone_from_classifier("lenet", LeNet5(), weights, stages, channels=1, min_size=32, fixed_size=32)


@BACKBONES.register("lenet_adda")
def lenet_adda(weights: str = "none", in_channels: int = 1) -> Backbone:
    stages = [["conv1"], ["conv2"], ["fc"]]
    return backbone_from_classifier("lenet_adda", LeNetADDA(in_channels=in_channels), weights, stages,
                                    channels=in_channels, min_size=28, fixed_size=28)
