"""CUDA caching-allocator settings (expandable segments, split size, garbage collection)."""

import torch

from memwise.core.errors import BadInputError
from memwise.core.recipe import Recipe
from memwise.core.strategy import Handle, Strategy, register

ALLOCATOR_KEYS = {
    "expandable_segments": ("True", "False"),
    "max_split_size_mb": None,
    "garbage_collection_threshold": None,
    "roundup_power2_divisions": None,
}


def parse_allocator_settings(text: str) -> dict[str, str]:
    """Parses `key:value,key:value` (PYTORCH_CUDA_ALLOC_CONF form) and checks keys and values."""
    settings: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition(":")
        if not sep or key not in ALLOCATOR_KEYS:
            raise BadInputError(
                f"allocator: cannot read {item!r}; use key:value pairs with keys {', '.join(ALLOCATOR_KEYS)}, "
                "e.g. expandable_segments:True,max_split_size_mb:128"
            )
        allowed = ALLOCATOR_KEYS[key]
        if allowed is not None and value not in allowed:
            raise BadInputError(f"allocator: {key} must be {' or '.join(allowed)}, got {value!r}")
        if allowed is None:
            try:
                number = float(value)
            except ValueError:
                raise BadInputError(f"allocator: {key} must be a number, got {value!r}") from None
            if number <= 0 or (key == "garbage_collection_threshold" and number >= 1):
                raise BadInputError(f"allocator: {key} out of range: {value!r}")
        settings[key] = value
    return settings


class AllocatorStrategy(Strategy):
    """Applies the settings to the CUDA caching allocator; on CPU they are reported and ignored."""

    field = "allocator"
    order = 0

    def patch_model(self, model: torch.nn.Module, recipe: Recipe, handle: Handle) -> None:
        settings = parse_allocator_settings(recipe.allocator)
        if not settings:
            return
        if not torch.cuda.is_available():
            handle.notes.append(f"allocator settings {recipe.allocator!r} apply to CUDA only: ignored on this CPU")
            return
        torch.cuda.memory._set_allocator_settings(recipe.allocator)
        handle.notes.append(f"CUDA allocator settings applied: {recipe.allocator}")


register(AllocatorStrategy())
