"""The process's random generators as one value: seed them, save their states, put them back.

"The generators" are those a training step or a `make_batch` commonly draws from without being
handed one: torch's CPU generator, every CUDA device's generator (when CUDA is initialized),
numpy's global generator (when numpy is installed) and Python's `random`.
"""

import random
from typing import Any

import torch


def seed_all(seed: int) -> None:
    """Seeds torch (CPU and CUDA), numpy's global generator and Python's `random` with `seed`."""
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    numpy = _numpy()
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


def capture_rng() -> dict[str, Any]:
    """The states of the generators now, as a picklable dict for `restore_rng`."""
    numpy = _numpy()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else None,
        "numpy": numpy.random.get_state() if numpy is not None else None,
        "python": random.getstate(),
    }


def restore_rng(states: dict[str, Any]) -> None:
    """Puts the generators back to `states` made by `capture_rng` (those it holds)."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    numpy = _numpy()
    if states.get("numpy") is not None and numpy is not None:
        numpy.random.set_state(states["numpy"])
    random.setstate(states["python"])


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # numpy is optional for torch
        return None
    return numpy
