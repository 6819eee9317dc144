"""The registries every config group names its entry in."""

from transfer_cli.registry import Registry

DATASETS = Registry("dataset")
BACKBONES = Registry("backbone")
METHODS = Registry("method")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")

# Importing the implementations fills the registries; they import the instances above, so this
# has to come after them.
from transfer_cli import data, methods, models, optim  # noqa: E402,F401
