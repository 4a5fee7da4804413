"""memwise: make PyTorch training and inference fit the memory you have, and show what every byte costs."""

from memwise import strategies  # noqa: F401  (registers the strategies)
from memwise.core.recipe import (
    CheckpointMode,
    Mode,
    OffloadMode,
    OptimizerName,
    OptimizerStateDtype,
    Precision,
    Recipe,
    SdpaBackend,
)
from memwise.core.strategy import Handle, apply_
from memwise.core.units import format_bytes, parse_size
from memwise.core.workload import Workload
from memwise.estimate.estimator import Estimate, estimate
from memwise.measure.profile import Profile, profile
from memwise.train import TrainResult, train
from memwise.workloads import load_workload

__version__ = "0.1.0"

__all__ = [
    "CheckpointMode", "Estimate", "Handle", "Mode", "OffloadMode", "OptimizerStateDtype", "SdpaBackend", "apply_", "OptimizerName", "Precision", "Profile", "Recipe", "Workload",
    "estimate", "format_bytes", "load_workload", "parse_size", "profile", "train", "TrainResult",
]
