"""Built-in example workloads and the resolution of workload specs (`name`, `file.py:fn`, `module:fn`)."""

from memwise.workloads.registry import BUILTIN_WORKLOADS, load_workload, parse_args

__all__ = ["BUILTIN_WORKLOADS", "load_workload", "parse_args"]
