"""CUDA caching-allocator settings (expandable segments, split size, garbage collection)."""

import torch

from memwise.core.errors import BadInputError
from memwise.core.recipe import Recipe
from memwise.core.strategy import Handle, Strategy

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
    """Applies the settings to the CUDA caching allocator; on CPU they are reported and ignored.

    The settings are process-wide: `Handle.remove()` puts back the settings string that was in
    force before (the environment's `PYTORCH_CUDA_ALLOC_CONF`, or the last one set), and
    `expandable_segments` explicitly, because the allocator keeps that key when a new string omits it.
    """

    field = "allocator"

    def patch_model(self, model: torch.nn.Module, recipe: Recipe, handle: Handle) -> None:
        settings = parse_allocator_settings(recipe.allocator)
        if not settings:
            return
        if not torch.cuda.is_available():
            handle.notes.append(f"allocator settings {recipe.allocator!r} apply to CUDA only: ignored on this CPU")
            return
        before = allocator_settings()
        set_allocator_settings(recipe.allocator)
        handle.on_remove(lambda: set_allocator_settings(restoring_settings(before, settings)))
        handle.notes.append(f"CUDA allocator settings applied for this run (restored afterwards): {recipe.allocator}")


def allocator_settings() -> str:
    """The allocator settings string in force (the last one set, or the environment's)."""
    return torch._C._accelerator_getAllocatorSettings()


def set_allocator_settings(text: str) -> None:
    torch._C._accelerator_setAllocatorSettings(text)


def restoring_settings(before: str, applied: dict[str, str]) -> str:
    """The settings string that undoes `applied` on top of `before`.

    Setting a string resets the allocator's split size, rounding and garbage-collection threshold
    to their defaults unless the string names them, but keeps `expandable_segments`: so `before`
    is set again with `expandable_segments` stated.
    """
    previous = {}
    for item in filter(None, (part.strip() for part in before.split(","))):
        key, _, value = item.partition(":")
        previous[key.strip()] = value.strip()
    if "expandable_segments" in applied and "expandable_segments" not in previous:
        previous["expandable_segments"] = "False"
    return ",".join(f"{key}:{value}" for key, value in previous.items())
