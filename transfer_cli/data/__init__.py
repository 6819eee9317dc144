"""Datasets (registered in DATASETS), splits and per-sample transforms."""

from transfer_cli.data import builtin, digits, imagefolder, text  # noqa: F401  (registers datasets)
from transfer_cli.data.splits import DataSplits

__all__ = ["DataSplits"]
