"""Shared by the strategy tests: train a fresh copy of a workload's model under a recipe."""

import copy

import torch

from memwise.core.recipe import Mode
from memwise.core.step import StepRunner


def train(workload, recipe, batches):
    """Losses of `recipe` over `batches` from a fresh copy of the workload's model, the trained copy and its runner."""
    torch.manual_seed(0)
    model = copy.deepcopy(workload.model)
    runner = StepRunner(workload, recipe, Mode.TRAIN, model, torch.device("cpu"))
    try:
        losses = [runner.step(batch) for batch in batches]
    finally:
        runner.close()
    return losses, model, runner
