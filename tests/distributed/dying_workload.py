"""A gpt-tiny workload whose rank 1 is killed (SIGKILL) while drawing the batch of step `die_at_step`."""

import os
import signal

import torch.distributed as dist

from memwise.workloads.gpt import gpt


def dying(*, die_at_step: int = 2):
    workload = gpt(preset="tiny")
    make_batch = workload.make_batch
    calls = {"n": 0}

    def deadly_make_batch(batch_size):
        if dist.is_initialized() and dist.get_rank() == 1 and calls["n"] == die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        calls["n"] += 1
        return make_batch(batch_size)

    workload.make_batch = deadly_make_batch
    return workload
