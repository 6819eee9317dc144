"""Transfer methods (registered in METHODS)."""

from transfer_cli.methods import distill, domain, finetune, lora, probe_scratch, self_training, shot  # noqa: F401  (registers methods)
from transfer_cli.methods.base import Method

__all__ = ["Method"]
