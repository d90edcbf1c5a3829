"""The training loop, its engines, checkpoints and metrics (see docs/interfaces.md)."""
