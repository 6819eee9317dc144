"""Backbones (registered in BACKBONES), the classifier built on them, and weight loading."""

from transfer_cli.models import (  # noqa: F401  (registers backbones)
    cifar_resnet,
    small_nets,
    text_backbones,
    timm_backbones,
    torchvision_backbones,
)
from transfer_cli.models.backbone import Backbone, Classifier

__all__ = ["Backbone", "Classifier"]
