"""Structured pruning with Torch-Pruning: remove whole channels and neurons, so layers really shrink.

Torch-Pruning's dependency graph removes an output channel of a layer together with everything
that consumes it (the next conv's input channel, the matching columns of a Linear after a flatten,
normalization entries), so the pruned model is an ordinary smaller model of the same class.
Which layers to prune, and how much, comes from a sensitivity scan: each layer is pruned alone at
each ratio and the metric drop measured.

Attention heads (`prune_heads`) are removed directly from BERT-style self-attention modules
(`query`/`key`/`value` Linear layers, `num_attention_heads`, `attention_head_size`, and a sibling
`output.dense` projection): a head's rows leave query, key and value, its columns leave the output
projection, and the head count attributes shrink, so the module's forward runs on fewer heads.

Known limitations: a layer whose pruning changes the model's output shape (the classifier, a
residual stream's width) or breaks its forward is not a channel candidate; heads are only removed
from attention modules of the layout above (BERT, MiniLM, RoBERTa, ...).
"""

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memwise.compress.quantize import MethodSkipped
from memwise.core.workload import call_model

SCAN_RATIOS = (0.25, 0.5, 0.75)
HEAD_SCAN_RATIOS = (0.25, 0.5)


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as error:
        raise MethodSkipped("structured pruning needs Torch-Pruning: pip install 'memwise[compress]'") from error
    return torch_pruning


def prune_structured(model: nn.Module, example_inputs: Any, ratios: dict[str, float]) -> nn.Module:
    """A copy of `model` with `ratios[name]` of the output channels/neurons of each named layer removed.

    Channels are ranked by the L2 norm of their whole dependency group (Torch-Pruning's
    `GroupMagnitudeImportance`). Layers not named keep their outputs but lose the inputs that fed
    from removed channels.
    """
    tp = _torch_pruning()
    pruned = copy.deepcopy(model).eval()
    roots = {name: pruned.get_submodule(name) for name, ratio in ratios.items() if ratio > 0}
    ignored = [
        module for name, module in pruned.named_modules()
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.LSTM)) and name not in roots
    ]
    pruner = tp.pruner.MetaPruner(
        pruned,
        example_inputs,  # Torch-Pruning calls model(**inputs) for a dict, model(*inputs) for a tuple
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.0,
        pruning_ratio_dict={module: ratios[name] for name, module in roots.items()},
        ignored_layers=ignored,
    )
    pruner.step()
    for parameter in pruned.parameters():
        parameter.requires_grad_(True)
    return pruned


def candidate_layers(model: nn.Module, example_inputs: Any, *, time_left: Callable[[], bool] = lambda: True) -> list[str]:
    """Conv/Linear layers that can lose half their outputs without changing the model's output shape.

    One dependency graph is built; a layer whose channel group reaches a LayerNorm or an
    embedding is a residual stream's width and is not a candidate (pruning it would touch every
    block). The others are pruned once at 50% and must still run and keep the output shape.
    """
    tp = _torch_pruning()
    with torch.no_grad():
        reference_shape = _output_shape(call_model(model, example_inputs))
    probe = copy.deepcopy(model).eval()
    graph = tp.DependencyGraph().build_dependency(probe, example_inputs=example_inputs)
    names_by_module = {module: name for name, module in probe.named_modules()}
    names = []
    for name, module in probe.named_modules():
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or not time_left():
            continue
        prune_out = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
        try:
            group = graph.get_pruning_group(module, prune_out, idxs=[0])
        except Exception:  # noqa: BLE001 - a layer Torch-Pruning cannot group is not a candidate
            continue
        touched = [dependency.target.module for dependency, _ in group]
        if any(isinstance(item, (nn.LayerNorm, nn.Embedding)) for item in touched):
            continue
        try:
            pruned = prune_structured(model, example_inputs, {names_by_module[module]: 0.5})
            with torch.no_grad():
                shape = _output_shape(call_model(pruned, example_inputs))
        except Exception:  # noqa: BLE001 - a layer Torch-Pruning or the forward cannot handle is simply not a candidate
            continue
        if shape == reference_shape and parameter_count(pruned) < parameter_count(model):
            names.append(name)
    return names


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sensitivity:
    """Metric drop when one layer alone is pruned at each ratio (measured, no recovery)."""

    layer: str
    drop_by_ratio: dict[float, float]
    parameters_removed_by_ratio: dict[float, int]


def sensitivity_scan(
    model: nn.Module,
    example_inputs: Any,
    evaluate: Callable[[nn.Module], float],
    layers: list[str],
    *,
    ratios: tuple[float, ...] = SCAN_RATIOS,
    on_step: Callable[[], bool] | None = None,
) -> list[Sensitivity]:
    """Prunes each layer alone at each ratio and measures the drop of `evaluate` from the original.

    `on_step()` is called after each evaluation; returning False stops the scan (budget spent).
    """
    return _scan(model, evaluate, layers, ratios, on_step, lambda layer, ratio: prune_structured(model, example_inputs, {layer: ratio}))


def _scan(model: nn.Module, evaluate: Callable[[nn.Module], float], layers: list[str], ratios: tuple[float, ...],
          on_step: Callable[[], bool] | None, prune_one: Callable[[str, float], nn.Module]) -> list[Sensitivity]:
    base_metric = evaluate(model)
    base_parameters = parameter_count(model)
    scan = []
    for layer in layers:
        drops, removed = {}, {}
        for ratio in ratios:
            pruned = prune_one(layer, ratio)
            drops[ratio] = base_metric - evaluate(pruned)
            removed[ratio] = base_parameters - parameter_count(pruned)
            if on_step is not None and not on_step():
                scan.append(Sensitivity(layer=layer, drop_by_ratio=drops, parameters_removed_by_ratio=removed))
                return scan
        scan.append(Sensitivity(layer=layer, drop_by_ratio=drops, parameters_removed_by_ratio=removed))
    return scan


def ratios_from_scan(scan: list[Sensitivity], tolerated_drop: float) -> dict[str, float]:
    """For each layer, the largest scanned ratio whose drop alone is at most `tolerated_drop`."""
    ratios = {}
    for item in scan:
        allowed = [ratio for ratio, drop in item.drop_by_ratio.items() if drop <= tolerated_drop]
        if allowed:
            ratios[item.layer] = max(allowed)
    return ratios


def attention_layers(model: nn.Module) -> dict[str, int]:
    """Names of the BERT-style self-attention modules whose heads can be removed, with their head counts.

    Such a module has `query`, `key` and `value` Linear layers, `num_attention_heads` and
    `attention_head_size`, and its parent has `output.dense`, the Linear that reads all heads.
    """
    layers = {}
    for name, module in model.named_modules():
        if _output_projection(model, name) is not None:
            layers[name] = int(module.num_attention_heads)
    return layers


def _output_projection(model: nn.Module, name: str) -> nn.Linear | None:
    module = model.get_submodule(name)
    linears = [getattr(module, part, None) for part in ("query", "key", "value")]
    if "." not in name or not all(isinstance(item, nn.Linear) for item in linears):
        return None
    heads, head_size = getattr(module, "num_attention_heads", None), getattr(module, "attention_head_size", None)
    if not isinstance(heads, int) or not isinstance(head_size, int) or any(item.out_features != heads * head_size for item in linears):
        return None
    parent = model.get_submodule(name.rsplit(".", 1)[0])
    dense = getattr(getattr(parent, "output", None), "dense", None)
    if not isinstance(dense, nn.Linear) or dense.in_features != heads * head_size:
        return None
    return dense


def weakest_heads(model: nn.Module, layer: str, count: int) -> list[int]:
    """The `count` heads of `layer` with the smallest L2 norm of their query/key/value rows and output columns."""
    module = model.get_submodule(layer)
    dense = _output_projection(model, layer)
    if dense is None:
        raise ValueError(f"{layer!r} is not a BERT-style self-attention module")
    heads, size = module.num_attention_heads, module.attention_head_size
    with torch.no_grad():
        norms = sum(
            linear.weight.detach().float().reshape(heads, size, -1).pow(2).sum(dim=(1, 2)) for linear in (module.query, module.key, module.value)
        ) + dense.weight.detach().float().reshape(dense.out_features, heads, size).pow(2).sum(dim=(0, 2))
    return sorted(torch.argsort(norms)[:count].tolist())


def prune_heads(model: nn.Module, heads: dict[str, list[int]]) -> nn.Module:
    """A copy of `model` without the attention heads `heads[layer]` (head indices) of each named layer.

    The heads' rows leave query, key and value, their columns leave the output projection, and
    `num_attention_heads` / `all_head_size` shrink; at least one head stays in each layer.
    """
    pruned = copy.deepcopy(model).eval()
    for layer, removed in heads.items():
        if not removed:
            continue
        module = pruned.get_submodule(layer)
        dense = _output_projection(pruned, layer)
        count, size = module.num_attention_heads, module.attention_head_size
        if dense is None or len(set(removed)) >= count or not all(0 <= head < count for head in removed):
            raise ValueError(f"cannot remove heads {removed} of {layer!r} ({count} heads)")
        keep = torch.tensor([head * size + offset for head in range(count) if head not in removed for offset in range(size)])
        for part in ("query", "key", "value"):
            setattr(module, part, _linear_subset(getattr(module, part), rows=keep))
        parent = pruned.get_submodule(layer.rsplit(".", 1)[0])
        parent.output.dense = _linear_subset(dense, columns=keep)
        module.num_attention_heads = count - len(set(removed))
        module.all_head_size = module.num_attention_heads * size
    return pruned


def _linear_subset(linear: nn.Linear, *, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, columns] if columns is not None else weight
    bias = linear.bias.detach()[rows] if linear.bias is not None and rows is not None else linear.bias
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def heads_for_ratios(model: nn.Module, ratios: dict[str, float]) -> dict[str, list[int]]:
    """The weakest `round(ratio * heads)` heads of each named attention layer (at most all but one)."""
    layers = attention_layers(model)
    heads = {}
    for layer, ratio in ratios.items():
        count = min(int(round(ratio * layers[layer])), layers[layer] - 1)
        if count > 0:
            heads[layer] = weakest_heads(model, layer, count)
    return heads


def head_sensitivity_scan(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    layers: list[str],
    *,
    ratios: tuple[float, ...] = HEAD_SCAN_RATIOS,
    on_step: Callable[[], bool] | None = None,
) -> list[Sensitivity]:
    """Removes the weakest `ratio` of the heads of each attention layer alone and measures the drop of `evaluate`.

    `on_step()` is called after each evaluation; returning False stops the scan (budget spent).
    """
    return _scan(model, evaluate, layers, ratios, on_step, lambda layer, ratio: prune_heads(model, heads_for_ratios(model, {layer: ratio})))


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _output_shape(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)):
        return tuple(_output_shape(item) for item in output)
    if isinstance(output, dict):
        return tuple((key, _output_shape(value)) for key, value in output.items())
    return type(output).__name__
