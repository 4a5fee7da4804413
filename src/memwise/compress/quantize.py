"""Quantization methods: dynamic int8 (Linear/LSTM), static int8 PTQ (conv nets), int8 embeddings, torchao.

Each function returns a new model and leaves its input untouched. The int8 modules defined here
are plain `nn.Module`s with int8 buffers, so a model that holds them pickles and reloads with
`load_compressed`.

`torch.ao.quantization` (eager dynamic and static quantization) is deprecated in favour of torchao
but still ships and works in torch 2.13; its migration warning is silenced inside these calls.
The static path is the eager one (QuantStub -> model -> DeQuantStub, x86 backend): PT2E moved to
torchao and its converted graph runs fp32 kernels between quantize/dequantize nodes unless compiled.
"""

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.ao.nn.quantized.dynamic as nnqd
import torch.nn.functional as F
from torch import nn

from memwise.core.workload import call_model

INT8_MAX = 127


class MethodSkipped(Exception):
    """A method cannot run on this model or installation; the message says why."""


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 quantization with one fp32 scale per row: `(weight_int8, scale)`."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / INT8_MAX).clamp(min=1e-12)
    return torch.round(weight / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 with one fp32 scale per row (symmetric, absmax).

    Rows are dequantized on lookup, so only the looked-up rows ever exist in fp32. The error of a
    row is at most half its scale, i.e. 0.4% of the row's largest magnitude.
    """

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, padding_idx: int | None) -> None:
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight_int8.shape

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> "Int8Embedding":
        weight_int8, scale = int8_rows(embedding.weight)
        return cls(weight_int8, scale, embedding.padding_idx)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[indices].to(self.scale.dtype) * self.scale[indices].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


class Int8DynamicLinear(nn.Module):
    """A Linear with int8 per-channel weights and int8 per-token activations (int8 x int8 -> int32 GEMM).

    Each token (row of the input) gets its own activation scale, computed at run time, so one
    outlier token or padding row does not coarsen the others, which is where the per-tensor
    activation scale of `torch.ao` dynamic quantization loses accuracy on transformers.
    """

    def __init__(self, weight_t_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight_t_int8", weight_t_int8)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = weight_t_int8.shape

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8DynamicLinear":
        weight_int8, scale = int8_rows(linear.weight)
        bias = linear.bias.detach().clone().float() if linear.bias is not None else None
        return cls(weight_int8.t().contiguous(), scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        row_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / INT8_MAX
        rows_int8 = torch.round(rows / row_scale).to(torch.int8)
        if rows_int8.shape[0] > 16:
            product = torch._int_mm(rows_int8, self.weight_t_int8).float()
        else:  # torch._int_mm needs more than 16 rows
            product = rows_int8.float() @ self.weight_t_int8.float()
        out = torch.addcmul(self.bias, product, row_scale * self.scale) if self.bias is not None else product * (row_scale * self.scale)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-token dynamic"


class StaticQuantized(nn.Module):
    """Eager static int8: quantize the first input, run the converted model, dequantize the output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant = QuantStub()
        self.model = model
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.dequant(self.model(self.quant(x), *args, **kwargs))


@contextlib.contextmanager
def _quiet_ao() -> Iterator[None]:
    with warnings.catch_warnings():
        # torch.ao.quantization's deprecation notice (migrate to torchao): the API still works in 2.13.
        warnings.filterwarnings("ignore", message=".*(migrat|deprecat|torch.ao.quantization).*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*_aminmax.*")
        yield


def linear_names(model: nn.Module) -> list[str]:
    """Names of the `nn.Linear` submodules of `model`, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def cpu_has_vnni() -> bool:
    """True when the CPU has AVX512-VNNI or AVX-VNNI (int8 dot products without 16-bit saturation)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class FullRangeDynamicLinear(nnqd.Linear):
    """`torch.ao` dynamic int8 Linear that may use all 8 bits of the activations.

    torch's module hard-codes `reduce_range=True` (7-bit activations) because without VNNI the
    int8 dot product saturates 16-bit sums. On a VNNI CPU the full range is safe, and on MiniLM it
    lifts the cosine to the original embeddings from 0.977 to 0.993.
    """

    reduce_range = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=self.reduce_range)
        return out.to(x.dtype)


def quantize_dynamic_int8(
    model: nn.Module,
    *,
    per_token: Iterable[str] = (),
    full_range: bool | None = None,
) -> nn.Module:
    """Dynamic int8: int8 per-channel weights, activations quantized per batch at run time.

    Args:
        model: the float model (not modified).
        per_token: Linear names to quantize with per-token activation scales instead
            (`Int8DynamicLinear`: more accurate, slower kernel) for layers too sensitive to one
            activation scale per batch.
        full_range: 8-bit instead of 7-bit activations; None means "if the CPU has VNNI".

    Returns:
        A new model whose Linear layers are `FullRangeDynamicLinear` (torch.ao dynamic Linear)
        or `Int8DynamicLinear`, and whose LSTM/GRU layers are torch.ao dynamic int8.
    """
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    quantized = copy.deepcopy(model).eval()
    per_token = set(per_token)
    for name in per_token:
        _replace(quantized, name, Int8DynamicLinear.from_float(quantized.get_submodule(name)))
    qconfig_spec: dict[Any, Any] = {name: per_channel_dynamic_qconfig for name in linear_names(quantized)}
    qconfig_spec[nn.LSTM] = default_dynamic_qconfig
    qconfig_spec[nn.GRU] = default_dynamic_qconfig
    with _quiet_ao():
        quantized = quantize_dynamic(quantized, qconfig_spec, dtype=torch.qint8)
    reduce_range = not (cpu_has_vnni() if full_range is None else full_range)
    for module in quantized.modules():
        if type(module) is nnqd.Linear:
            module.__class__ = FullRangeDynamicLinear
            module.reduce_range = reduce_range
    return quantized


def quantize_embeddings_int8(model: nn.Module, *, min_parameters: int = 4096) -> nn.Module:
    """Replaces every `nn.Embedding` with at least `min_parameters` weights by an `Int8Embedding`."""
    quantized = copy.deepcopy(model)
    for name, module in list(quantized.named_modules()):
        if isinstance(module, nn.Embedding) and module.weight.numel() >= min_parameters:
            _replace(quantized, name, Int8Embedding.from_float(module))
    return quantized


def embedding_parameters(model: nn.Module) -> int:
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Embedding))


def quantize_static_int8(model: nn.Module, calibration: Iterable[Any], check_input: Any) -> nn.Module:
    """Static int8 post-training quantization (eager mode, x86 backend) calibrated on `calibration`.

    Conv and Linear layers become int8 kernels with int8 activations between them; functional
    ReLU, pooling and flatten run on the quantized tensors. The model must take one tensor input.

    Raises:
        MethodSkipped: the model has an op that does not accept quantized tensors, or does not
            take a single tensor input.
    """
    from torch.ao.quantization import convert, get_default_qconfig, prepare

    if not isinstance(check_input, torch.Tensor):
        raise MethodSkipped("static int8 needs a model that takes one tensor input")
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        raise MethodSkipped(f"static int8 needs the x86 quantized engine, this torch runs {torch.backends.quantized.engine!r}")
    wrapped = StaticQuantized(copy.deepcopy(model)).eval()
    wrapped.qconfig = get_default_qconfig("x86")
    with _quiet_ao():
        prepared = prepare(wrapped, inplace=False)
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        quantized = convert(prepared, inplace=False)
        try:
            with torch.no_grad():
                quantized(check_input)
        except (RuntimeError, NotImplementedError) as error:
            raise MethodSkipped(f"static int8: the model runs an op without a quantized kernel ({str(error).splitlines()[0][:160]})") from error
    return quantized


def quantize_torchao_weight_only(model: nn.Module, *, bits: int) -> nn.Module:
    """torchao weight-only quantization of `nn.Linear` (int8, or int4 with group size 32).

    Raises:
        MethodSkipped: torchao is not installed, or the int4 kernels are missing on this device.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as error:
        raise MethodSkipped("torchao is not installed: pip install 'memwise[compress]'") from error
    quantized = copy.deepcopy(model).eval()
    config: Callable[[], Any] = Int8WeightOnlyConfig if bits == 8 else (lambda: Int4WeightOnlyConfig(group_size=32))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(quantized, config())
    except (ImportError, NotImplementedError, AssertionError, ValueError, RuntimeError) as error:
        raise MethodSkipped(f"torchao int{bits} weight-only does not run on CPU with this torchao ({type(error).__name__}: {str(error)[:120]})") from error
    return quantized


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    setattr(owner, leaf, new)
