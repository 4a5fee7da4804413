"""Memory-saving techniques, one module per Recipe field, and the one list that orders them.

Importing a strategy module registers nothing: `STRATEGIES` below is the registry, read by
`memwise.core.strategy` when the first step is set up. Its order is the order of application
(`patch_model`), of optimizer wrapping (the first wraps innermost) and of context nesting (the
first is outermost).
"""

from memwise.core.strategy import Handle, Strategy, StrategyEffects, apply_
from memwise.strategies.allocator import AllocatorStrategy
from memwise.strategies.attention import AttentionStrategy
from memwise.strategies.checkpoint import CheckpointStrategy
from memwise.strategies.offload import OffloadStrategy
from memwise.strategies.optimizer_state import OptimizerStateStrategy
from memwise.strategies.precision import PrecisionStrategy

STRATEGIES: tuple[Strategy, ...] = (
    # Process-wide allocator settings first: they should hold before anything else allocates.
    AllocatorStrategy(),
    # Replaces the base Adam/AdamW with LowPrecisionAdam, so it must wrap innermost: the
    # master-weight wrappers of precision and offload then step it on their masters (applied
    # after them it would discard their masters).
    OptimizerStateStrategy(),
    # bf16 weights with fp32 masters (wraps the optimizer); autocast, the outermost forward context.
    PrecisionStrategy(),
    # The SDPA kernel choice, inside autocast.
    AttentionStrategy(),
    # Wraps block forwards; recomputation in backward re-enters the contexts above.
    CheckpointStrategy(),
    # Masters and optimizer state on the host: the outermost optimizer wrapper; saved tensors to
    # host memory through saved-tensor hooks.
    OffloadStrategy(),
)

__all__ = ["STRATEGIES", "Handle", "Strategy", "StrategyEffects", "apply_"]
