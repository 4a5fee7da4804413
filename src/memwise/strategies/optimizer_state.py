"""Optimizer state precision: Adam/AdamW moments in fp32, bf16, or 8-bit block-quantized.

`LowPrecisionAdam` keeps `exp_avg` and `exp_avg_sq` in a compact form and updates each parameter
in fp32 scratch that lives only while that parameter is updated, so the persistent state shrinks
(bf16: 2 bytes per moment element, 8-bit: 1 byte plus one fp32 scale per 256 elements) while the
arithmetic of torch's Adam/AdamW is kept.

The 8-bit form is block-wise absmax quantization (as in Dettmers et al., "8-bit Optimizers via
Block-wise Quantization"), with a linear code: `exp_avg` signed in [-127, 127] per block, and
`exp_avg_sq` stored as its square root in [0, 255] per block (the square root halves its dynamic
range). It is memwise's own implementation, not bitsandbytes'.
"""

import math

import torch

from memwise.core.errors import BadInputError
from memwise.core.recipe import OptimizerName, OptimizerStateDtype, Recipe
from memwise.core.strategy import Handle, OptimizerBuilder, Strategy

BLOCK = 256


def quantize_signed(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and per-block fp32 scales of `values` (flattened, padded to whole blocks)."""
    blocks = _blocks(values)
    # the largest |value| per block without an |values| copy: the scratch of a step is what a large
    # parameter's update adds to the peak
    scale = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg()).clamp_min(1e-30)
    codes = (blocks / scale[:, None]).mul_(127).round_().to(torch.int8)
    return codes, scale


def dequantize_signed(codes: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return codes.float().mul_(scale[:, None] / 127).flatten()[: like.numel()].view_as(like)


def quantize_sqrt(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes of sqrt(values) (values >= 0) and per-block fp32 scales.

    Rounds to the nearest code, except that a positive value never gets code 0: a second moment
    read back as 0 next to a nonzero first moment makes Adam's update `lr * m / eps`, a jump of
    hundreds of `lr` that blows the weights up.
    """
    blocks = _blocks(values).sqrt()
    scale = blocks.amax(dim=1).clamp_min(1e-30)
    scaled = blocks.div_(scale[:, None]).mul_(255)  # in place: `blocks` is this function's own copy
    zero = scaled == 0
    codes = scaled.round_().clamp_min_(1).masked_fill_(zero, 0).to(torch.uint8)
    return codes, scale


def dequantize_sqrt(codes: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return codes.float().mul_(scale[:, None] / 255).square_().flatten()[: like.numel()].view_as(like)


def _blocks(values: torch.Tensor) -> torch.Tensor:
    flat = values.detach().float().flatten()
    padding = (-flat.numel()) % BLOCK
    if padding:
        flat = torch.nn.functional.pad(flat, (0, padding))
    return flat.view(-1, BLOCK)


class LowPrecisionAdam(torch.optim.Optimizer):
    """Adam (`decoupled=False`) or AdamW (`decoupled=True`) with bf16 or 8-bit moments.

    Args:
        params: parameters to optimize.
        lr, betas, eps, weight_decay: as in `torch.optim.AdamW`.
        decoupled: AdamW's decoupled weight decay, else Adam's L2 penalty.
        state_dtype: `bf16` or `8bit`.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, decoupled: bool = True, state_dtype: OptimizerStateDtype = OptimizerStateDtype.BF16) -> None:
        if state_dtype == OptimizerStateDtype.FP32:
            raise BadInputError("state_dtype: LowPrecisionAdam stores bf16 or 8bit moments; use torch.optim.AdamW for fp32")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.decoupled = decoupled
        self.state_dtype = OptimizerStateDtype(state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    self._store(state, torch.zeros_like(grad), torch.zeros_like(grad))
                state["step"] += 1
                exp_avg, exp_avg_sq = self._load(state, grad)
                weight = param.float()
                if group["weight_decay"]:
                    if self.decoupled:
                        weight.mul_(1 - group["lr"] * group["weight_decay"])
                    else:
                        grad = grad.add(weight, alpha=group["weight_decay"])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1 ** state["step"]
                bias_correction2 = 1 - beta2 ** state["step"]
                denominator = exp_avg_sq.sqrt().div_(math.sqrt(bias_correction2)).add_(group["eps"])
                weight.addcdiv_(exp_avg, denominator, value=-group["lr"] / bias_correction1)
                del denominator  # free it before the moments are re-encoded
                param.copy_(weight)
                self._store(state, exp_avg, exp_avg_sq)
        return loss

    def _store(self, state: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        if self.state_dtype == OptimizerStateDtype.BF16:
            state["exp_avg"] = exp_avg.to(torch.bfloat16)
            state["exp_avg_sq"] = exp_avg_sq.to(torch.bfloat16)
            return
        state["exp_avg_codes"], state["exp_avg_scale"] = quantize_signed(exp_avg)
        state["exp_avg_sq_codes"], state["exp_avg_sq_scale"] = quantize_sqrt(exp_avg_sq)

    def _load(self, state: dict, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.state_dtype == OptimizerStateDtype.BF16:
            return state["exp_avg"].float(), state["exp_avg_sq"].float()
        return (dequantize_signed(state["exp_avg_codes"], state["exp_avg_scale"], like),
                dequantize_sqrt(state["exp_avg_sq_codes"], state["exp_avg_sq_scale"], like))


class OptimizerStateStrategy(Strategy):
    """Replaces the built-in Adam/AdamW by `LowPrecisionAdam` when `optimizer_state` is bf16 or 8bit."""

    field = "optimizer_state"

    def wrap_optimizer(self, build: OptimizerBuilder, recipe: Recipe, handle: Handle) -> OptimizerBuilder:
        if recipe.optimizer_state == OptimizerStateDtype.FP32:
            return build
        if recipe.optimizer not in (OptimizerName.ADAM, OptimizerName.ADAMW, None):
            raise BadInputError(
                f"optimizer_state={recipe.optimizer_state.value}: only adam and adamw have moments to shrink, "
                f"got optimizer={recipe.optimizer.value}"
            )
        decoupled = recipe.optimizer != OptimizerName.ADAM
        weight_decay = 0.01 if decoupled else 0.0  # torch's defaults for AdamW and Adam
        return lambda params: LowPrecisionAdam(params, lr=1e-3, weight_decay=weight_decay, decoupled=decoupled,
                                               state_dtype=recipe.optimizer_state)
