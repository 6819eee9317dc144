"""Backbones (registered in BACKBONES), the classifier built on them, and weight loading."""

from transfer_cli.models import cifar_resnet, small_nets, torchvision_backbones  # noqa: F401  (registers backbones)
from transfer_cli.models.backbone import Backbone, Classifier

__all__ = ["Backbone", "Classifier"]
