"""Memory of LLM generation (`model.generate`): the result type, and its measurement.

A generation is a prefill (one forward over the prompt, filling the key/value cache) and then one
decoding forward per new token. `profile_generation` runs the real `model.generate` greedily under
the allocator profiler, with a phase mark before every forward, so the peak says whether it came
in the prefill or while decoding.
"""

import contextlib
import dataclasses
import enum
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError
from memwise.core.serialize import from_dict, to_dict
from memwise.core.workload import Workload
from memwise.measure.tracker import persistent_tensors, record_steps


class CacheKind(str, enum.Enum):
    """The key/value cache class transformers uses: `dynamic` (grows by concatenation) or `static`
    (allocated once for the prompt plus every new token)."""

    DYNAMIC = "dynamic"
    STATIC = "static"


class KvCacheDtype(str, enum.Enum):
    """Element type of a quantized key/value cache in a what-if (`model` keeps the model's dtype)."""

    MODEL = "model"
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"


KV_DTYPE_BYTES = {KvCacheDtype.BF16: 2, KvCacheDtype.FP8: 1, KvCacheDtype.INT8: 1}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationShape:
    """What is generated: `batch_size` sequences of `context_length` prompt tokens, `new_tokens` each."""

    batch_size: int
    context_length: int
    new_tokens: int
    cache: CacheKind = CacheKind.DYNAMIC

    def __post_init__(self) -> None:
        for name in ("batch_size", "context_length", "new_tokens"):
            positive_int(getattr(self, name), name)
        try:
            object.__setattr__(self, "cache", CacheKind(self.cache))
        except ValueError:
            raise BadInputError(f"cache: invalid value {self.cache!r}; valid values are dynamic, static") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class KvCacheLayout:
    """The key/value cache's shape, from the model config.

    Attributes:
        layers: decoder layers holding a cache.
        kv_heads: key/value heads per layer (fewer than query heads with grouped-query attention).
        head_dim: features per head.
        dtype_bytes: bytes per element (the model's dtype).
    """

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    def bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """The back-of-envelope figure: 2 (K and V) x layers x KV heads x head dim x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * (dtype_bytes or self.dtype_bytes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationWhatIf:
    """The peak of a changed generation (smaller batch, static cache, ...), estimated."""

    change: str
    peak_bytes: int
    saving_bytes: int
    fits: bool | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationMemory:
    """The peak memory of `model.generate`: prefill plus decoding, measured or estimated.

    Attributes:
        source: `measured` (allocator events of a real run) or `estimated` (fake-tensor run).
        workload: the workload's name.
        batch_size, context_length, new_tokens, cache: what was generated (see `GenerationShape`).
        kv_cache_dtype: the cache's element type (`model`: the model's dtype).
        peak_bytes: the most bytes live at once, weights included.
        phase_at_peak: `prefill` or `decode`.
        step_at_peak: the forward at the peak (0 = prefill, k = k-th new token after the first).
        weight_bytes: parameters and buffers.
        kv_cache_bytes: the full cache after the last token (the back-of-envelope formula).
        kv_cache_bytes_per_token: 2 x layers x KV heads x head dim x bytes.
        logits_bytes_prefill: the logits of the prefill forward (all positions, or the last one
            when the model honours transformers' `logits_to_keep`).
        layout: the cache's shape.
        budget_bytes: the budget asked about, else None.
        fits: whether `peak_bytes <= budget_bytes` (None without a budget).
        max_batch_size: the most sequences that fit the budget (None without a budget; 0 when
            not even one does).
        what_ifs: changed generations and their peaks.
        generate_ms: wall time of the measured generate (None when estimated).
        device: where it ran (estimates: the CPU, whose allocator they model).
        notes: assumptions and limitations that apply.
        torch_version, transformers_version: library versions.
    """

    source: str
    workload: str
    batch_size: int
    context_length: int
    new_tokens: int
    cache: CacheKind
    kv_cache_dtype: KvCacheDtype
    peak_bytes: int
    phase_at_peak: str
    step_at_peak: int
    weight_bytes: int
    kv_cache_bytes: int
    kv_cache_bytes_per_token: int
    logits_bytes_prefill: int
    layout: KvCacheLayout
    budget_bytes: int | None = None
    fits: bool | None = None
    max_batch_size: int | None = None
    what_ifs: tuple[GenerationWhatIf, ...] = ()
    generate_ms: float | None = None
    device: str = "cpu"
    notes: tuple[str, ...] = ()
    torch_version: str = ""
    transformers_version: str = ""

    @property
    def mode(self) -> str:
        return "generate"

    def to_dict(self) -> dict[str, Any]:
        return {**to_dict(self), "mode": "generate"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationMemory":
        return from_dict(cls, {key: value for key, value in data.items() if key != "mode"}, where="generation memory")


def causal_lm(workload: Workload) -> torch.nn.Module:
    """The workload's model if it is a transformers causal LM that can `generate`, else BadInputError."""
    model = workload.model
    if not callable(getattr(model, "generate", None)) or getattr(getattr(model, "config", None), "is_encoder_decoder", True):
        raise BadInputError(
            f"--mode generate: {workload.name} is not a Hugging Face causal LM with .generate(); "
            "use an hf: decoder such as hf:gpt2, hf:llama, hf:mistral or hf:qwen2"
        )
    return model


def kv_cache_layout(model: torch.nn.Module) -> KvCacheLayout:
    """The cache's layers, KV heads and head dim from a transformers config (GPT-2 and Llama-style names)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = _first_int(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first_int(config, "num_attention_heads", "n_head")
    kv_heads = _first_int(config, "num_key_value_heads", "n_head_kv", default=heads)
    hidden = _first_int(config, "hidden_size", "n_embd", "d_model")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    dtype = next(model.parameters()).dtype
    return KvCacheLayout(layers=layers, kv_heads=kv_heads, head_dim=int(head_dim), dtype_bytes=dtype.itemsize)


def _first_int(config: Any, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if default is None:
        raise BadInputError(f"--mode generate: the model config has none of {', '.join(names)}; cannot size the KV cache")
    return default


def generate_kwargs(shape: GenerationShape, model: torch.nn.Module) -> dict[str, Any]:
    """The `generate` arguments memwise measures and estimates with: greedy, exactly `new_tokens`.

    The end-of-sequence token is switched off (no early stop, no extra logits processor), so every
    sequence produces `new_tokens` tokens whatever the random weights predict.
    """
    generation_config = _copy_generation_config(model)
    generation_config.eos_token_id = None
    generation_config.pad_token_id = 0
    generation_config.do_sample = False
    generation_config.max_new_tokens = shape.new_tokens
    generation_config.min_new_tokens = None
    generation_config.max_length = None
    generation_config.use_cache = True
    generation_config.cache_implementation = "static" if shape.cache is CacheKind.STATIC else None
    for name in ("temperature", "top_p", "top_k"):  # greedy: sampling settings only trigger warnings
        if hasattr(generation_config, name):
            setattr(generation_config, name, None)
    return {"generation_config": generation_config}


def _copy_generation_config(model: torch.nn.Module) -> Any:
    import copy

    import transformers

    config = getattr(model, "generation_config", None)
    return copy.deepcopy(config) if config is not None else transformers.GenerationConfig.from_model_config(model.config)


@contextlib.contextmanager
def forward_phases(model: torch.nn.Module, mark: Callable[[str, int], None]) -> Iterator[None]:
    """Calls `mark("prefill", 0)` before the first forward of `model`, then `mark("decode", k)`."""
    count = [0]

    def before(*_: Any) -> None:
        mark("prefill" if count[0] == 0 else "decode", count[0])
        count[0] += 1

    handle = model.register_forward_pre_hook(before)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def use_cache(model: torch.nn.Module) -> Iterator[None]:
    """Turns the model config's `use_cache` on (memwise's hf workloads turn it off for training steps)."""
    config = model.config
    previous = getattr(config, "use_cache", None)
    config.use_cache = True
    try:
        yield
    finally:
        config.use_cache = previous


def prompt(shape: GenerationShape, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random prompt ids (below `vocab_size`) and an all-ones attention mask."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab_size, (shape.batch_size, shape.context_length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def vocab_size_of(model: torch.nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return _first_int(config, "vocab_size")


def profile_generation(workload: Workload, shape: GenerationShape) -> GenerationMemory:
    """Runs `model.generate` for real on the CPU (greedy, exactly `new_tokens`) and measures its peak.

    Returns:
        A `GenerationMemory` with `source="measured"`: `peak_bytes` from the allocator's events,
        weights included; the cache and logits figures are the formula's (they are sizes, not
        measurements).
    """
    import transformers

    model = causal_lm(workload)
    layout = kv_cache_layout(model)
    kwargs = generate_kwargs(shape, model)
    inputs = prompt(shape, vocab_size_of(model))
    was_training = model.training
    model.eval()
    elapsed: list[float] = []

    def run_step(_: int, marker: Any) -> None:
        start = time.perf_counter()
        with forward_phases(model, lambda phase, step: marker("phase", phase, step)):
            output = model.generate(**inputs, **kwargs)
        elapsed.append((time.perf_counter() - start) * 1e3)
        if output.shape[1] != shape.context_length + shape.new_tokens:
            raise BadInputError(f"generate made {output.shape[1] - shape.context_length} tokens, expected {shape.new_tokens}")

    try:
        with torch.no_grad(), use_cache(model):
            log, _ = record_steps(run_step, model, persistent_tensors(model), mode="infer", steps=1, device=torch.device("cpu"))
    finally:
        model.train(was_training)
    breakdown = log.summarize()
    return GenerationMemory(
        source="measured", workload=workload.name, batch_size=shape.batch_size, context_length=shape.context_length,
        new_tokens=shape.new_tokens, cache=shape.cache, kv_cache_dtype=KvCacheDtype.MODEL, peak_bytes=breakdown.peak_bytes,
        phase_at_peak=breakdown.phase_at_peak, step_at_peak=breakdown.step_at_peak,
        weight_bytes=breakdown.baseline_bytes, kv_cache_bytes=layout.bytes_per_token() * shape.batch_size * (shape.context_length + shape.new_tokens),
        kv_cache_bytes_per_token=layout.bytes_per_token(), logits_bytes_prefill=_prefill_logits_bytes(model, shape),
        layout=layout, generate_ms=elapsed[0] if elapsed else None, torch_version=torch.__version__,
        transformers_version=transformers.__version__,
    )


def _prefill_logits_bytes(model: torch.nn.Module, shape: GenerationShape) -> int:
    import inspect

    keeps_last_only = "logits_to_keep" in inspect.signature(model.forward).parameters
    positions = 1 if keeps_last_only else shape.context_length
    dtype_bytes = next(model.parameters()).dtype.itemsize
    return shape.batch_size * positions * vocab_size_of(model) * dtype_bytes
