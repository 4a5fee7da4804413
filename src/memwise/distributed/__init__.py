"""Scaling past one process: torchrun launch, DDP/FSDP2 training, per-rank estimates."""

from memwise.distributed.config import DistributedTrainConfig, DistStrategy
from memwise.distributed.estimate import RankEstimate, estimate_per_rank
from memwise.distributed.launch import RankFailedError, check_nproc, launch_train
from memwise.distributed.result import DistributedProfile, DistributedTrainResult, RankMemory

__all__ = ["DistStrategy", "DistributedProfile", "DistributedTrainConfig", "DistributedTrainResult", "RankEstimate", "RankFailedError", "RankMemory", "estimate_per_rank", "check_nproc", "launch_train"]
