"""Memory-saving techniques, one module per Recipe field; importing this package registers them."""

from memwise.core.strategy import Handle, apply_
from memwise.strategies import allocator, attention, checkpoint, offload, optimizer_state, precision  # noqa: F401

__all__ = ["Handle", "apply_"]
