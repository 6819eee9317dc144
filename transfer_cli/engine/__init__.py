"""The generic training loop, its hooks, device/precision helpers and checkpoint files."""
