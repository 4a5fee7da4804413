"""Training that survives running out of memory: `memwise.train`."""

from memwise.train.runner import OomEvent, TrainResult, train

__all__ = ["OomEvent", "TrainResult", "train"]
