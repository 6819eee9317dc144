"""transfer_cli: config-driven transfer-learning experiments in PyTorch."""

__version__ = "0.1.0"
