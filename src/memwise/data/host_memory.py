"""Host memory of a process tree (the main process and its DataLoader workers).

Memory is counted as PSS (proportional set size): a page shared by k processes counts 1/k in each,
so the sum over the tree is the physical memory the tree uses, with the parent's pages that forked
workers still share counted once. RSS would count every shared page once per process (a fork of a
2 GiB process would "cost" 2 GiB more); USS would count shared pages in no process at all.
"""

import os

import psutil

MEMORY_METRIC = "pss"


def tree_pss_bytes(root_pid: int | None = None) -> int:
    """Bytes of PSS summed over `root_pid` (default: this process) and all its descendants."""
    root = psutil.Process(root_pid or os.getpid())
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a worker that exited between listing and reading holds no memory
    return total
