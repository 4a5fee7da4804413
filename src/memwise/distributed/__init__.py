"""Scaling past one process: torchrun launch, DDP/FSDP2 training, per-rank estimates."""

from memwise.distributed.config import DistributedTrainConfig, DistStrategy
from memwise.distributed.launch import RankFailedError, check_nproc, launch_train
from memwise.distributed.result import DistributedTrainResult, RankMemory

__all__ = ["DistStrategy", "DistributedTrainConfig", "DistributedTrainResult", "RankFailedError", "RankMemory", "check_nproc", "launch_train"]
