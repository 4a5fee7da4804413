"""CPU latency of several models measured side by side: interleaved rounds, median per model.

Interleaving (original, candidate, original, candidate, ...) means that a machine that gets busier
or quieter during the measurement affects every model alike, so the ratio stays meaningful where
absolute milliseconds do not.
"""

import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from memwise.core.workload import call_model


def latency_side_by_side(
    models: Mapping[str, nn.Module],
    batches: Mapping[str, Any],
    *,
    target_s: float = 2.0,
    min_rounds: int = 3,
    max_rounds: int = 25,
) -> dict[str, dict[str, float]]:
    """Median forward time in ms of each model on each batch, measured in interleaved rounds.

    Args:
        models: the models by name (run in eval mode, without gradients).
        batches: the inputs by name, e.g. {"batch_1": ..., "batch_32": ...}.
        target_s: about how long to spend per batch (rounds are sized from a warm-up).
        min_rounds: at least this many timed calls per model and batch.
        max_rounds: at most this many.

    Returns:
        `{model_name: {batch_name: median_ms}}`.
    """
    result: dict[str, dict[str, float]] = {name: {} for name in models}
    with torch.no_grad():
        for batch_name, batch in batches.items():
            warm_s = 0.0
            for model in models.values():
                model.eval()
                start = time.perf_counter()
                call_model(model, batch)
                warm_s += time.perf_counter() - start
            rounds = max(min_rounds, min(max_rounds, int(target_s / max(warm_s, 1e-6))))
            times: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(rounds):
                for name, model in models.items():
                    start = time.perf_counter()
                    call_model(model, batch)
                    times[name].append((time.perf_counter() - start) * 1000.0)
            for name in models:
                result[name][batch_name] = statistics.median(times[name])
    return result
