"""Memory-saving techniques, one module per Recipe field; importing this package registers them."""

from memwise.core.strategy import Handle, apply_
from memwise.strategies import (  # noqa: F401
    allocator,
    attention,
    checkpoint,
    offload,
    optimizer_state,
    precision,
)

__all__ = ["Handle", "apply_"]
