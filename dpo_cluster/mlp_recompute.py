"""Gated (SwiGLU) MLPs that keep three of their four intermediate activations for backward.

`recompute_mlp_activations(model)` switches every MLP whose forward is exactly
`down_proj(silu(gate_proj(x)) * up_proj(x))` (checked against its source) to `silu_mul`, which keeps
gate(x) and up(x) and recomputes silu in backward. These are a layer's largest activations, so this
saves memory for no extra matrix work; only the instance's forward changes, so LoRA, quantized layers,
ZeRO-3 gathering and gradient checkpointing see the projection calls they expect.
"""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
import types
from functools import cache

import torch
from torch import nn

logger = logging.getLogger(__name__)


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up (not silu(gate)) for backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, gate: torch.Tensor, up: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return nn.functional.silu(gate) * up

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_up = grad_out * silu
        # d silu(g) / dg = sig + g * sig * (1 - sig) = sig + silu * (1 - sig), built in place in
        # silu's buffer so that backward holds as few (tokens, intermediate) temporaries as it can.
        grad_gate = silu.mul_(1 - sig).add_(sig).mul_(up).mul_(grad_out)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate, up (..., I) -> (..., I)`; backward keeps gate and up only."""
    return _SiluMul.apply(gate, up)


def _recomputing_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


@cache
def _has_gated_forward(cls: type) -> bool:
    """Whether `cls.forward(self, x)` is `return self.down_proj(self.act_fn(self.gate_proj(x)) *
    self.up_proj(x))`, directly or through one local variable (read from its source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    function = tree.body[0] if tree.body else None
    if not isinstance(function, ast.FunctionDef) or len(function.args.args) != 2:
        return False
    x = function.args.args[1].arg
    expected = f"self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))"
    body = [ast.unparse(statement) for statement in function.body]
    if len(body) == 2 and body[0].endswith(f" = {expected}"):
        name = body[0].split(" = ", 1)[0]
        return name.isidentifier() and body[1] == f"return {name}"
    return body == [f"return {expected}"]


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    from transformers.activations import SiLUActivation

    return (
        all(
            isinstance(getattr(module, name, None), nn.Module)
            for name in ("gate_proj", "up_proj", "down_proj")
        )
        and isinstance(getattr(module, "act_fn", None), SiLUActivation | nn.SiLU)
        and "forward" not in vars(module)  # not switched already, nor given a forward of its own
        and _has_gated_forward(type(module))
    )


def recompute_mlp_activations(model: nn.Module) -> int:
    """Switch every gated SiLU MLP of `model` to `silu_mul`; returns how many were switched."""
    switched = 0
    for module in model.modules():
        if _is_gated_silu_mlp(module):
            module.forward = types.MethodType(_recomputing_forward, module)
            switched += 1
    logger.debug("model.recompute_mlp_activations: %d gated MLPs switched", switched)
    return switched
