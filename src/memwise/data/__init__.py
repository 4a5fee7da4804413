"""Input pipeline and host memory: DataLoader tuning by measurement, memory-mapped datasets."""

from memwise.data.host_memory import MEMORY_METRIC, tree_pss_bytes
from memwise.data.memmap import MemmapDataset, smallest_exact_dtype
from memwise.data.tune import LoaderCandidate, LoaderConfig, candidate_settings, tune_loader
from memwise.data.workload_dataset import dataset_of

__all__ = [
    "MEMORY_METRIC", "LoaderCandidate", "LoaderConfig", "MemmapDataset", "candidate_settings", "dataset_of",
    "smallest_exact_dtype", "tree_pss_bytes", "tune_loader",
]
