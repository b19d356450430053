"""Recompute an adapter's input in backward instead of keeping it alive (``--lora-recompute-input``).

The down-projection ``h = A x`` (``x [N, in]``, ``A [r, in]``, ``h [N, r]``) needs ``x`` again in
backward for ``dL/dA = (dL/dh)^T x``.  A frozen base layer keeps no activation (megatron's frozen
linears save only their weight), so ``x`` is the largest thing a LoRA layer holds: ``N x in`` floats for an
``r``-column result.  In a transformer layer ``x`` is the output of a cheap producer whose own
backward keeps *its* input anyway:

* RMSNorm / LayerNorm before ``linear_qkv`` and ``linear_fc1``: ``x = norm(z)``, and the norm saves ``z``;
* SwiGLU before ``linear_fc2``: ``x = silu(g) * u`` of ``[g, u]``, which SwiGLU saves.

So the producer tags its output with a recipe (itself and its input), and the down-projection
saves the recipe's input, which shares storage with what the producer saved, instead of ``x``.
Backward runs the producer once more without grad: one elementwise pass per layer.  For a
SmolLM2-shaped model that drops ``576 + 576 + 1536`` floats per token and layer, a quarter of
what a LoRA micro-batch keeps for backward (0.298 -> 0.222 GiB per 256 tokens), for ~3% of the
step time (``benchmarks/lora_vs_full.py``).

Recomputing is exact: the same kernel on the same input gives the same bits.  A recipe is used
only if the tensor the adapter receives is the very tensor the producer returned, unmodified
(its version counter unchanged); anything else saves ``x`` as usual.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_RECIPE_ATTR = "_lora_input_recipe"


def mark_recomputable(output: torch.Tensor, producer: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
    """Record that ``output == producer(*inputs)`` (bitwise), valid while ``output`` is not modified.

    Nothing is recorded without grad or when an input does not require grad: then the producer's
    backward keeps nothing, keeping its input instead of ``output`` would cost as much or more
    (SwiGLU's input is twice its output), and the tag would keep that input alive.
    """
    if torch.is_grad_enabled() and all(t.requires_grad for t in inputs):
        setattr(output, _RECIPE_ATTR, (producer, inputs, output._version))


def recipe_of(x: torch.Tensor) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]] | None:
    """``(producer, inputs)`` that recompute ``x``; None without a recipe or if ``x`` changed since."""
    recipe = getattr(x, _RECIPE_ATTR, None)
    if recipe is None or recipe[2] != x._version:
        return None
    return recipe[0], recipe[1]


class _DownProjection(torch.autograd.Function):
    """``h = x @ A^T`` that saves ``producer``'s inputs instead of ``x = producer(*inputs)``.

    Backward with ``dh [N, r]``: ``dL/dx = dh @ A`` ``[N, in]``, ``dL/dA = dh^T @ x`` ``[r, in]``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, producer, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.producer = producer
        ctx.save_for_backward(A, *inputs)
        return F.linear(x, A)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        A, *inputs = ctx.saved_tensors
        grad_x = grad_A = None
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                x = ctx.producer(*inputs)
            grad_A = torch.mm(dh.reshape(-1, dh.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(dh, A)
        return (grad_x, grad_A, None) + (None,) * len(inputs)


def down_project(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``x @ A^T`` [..., r]; backward recomputes ``x`` from its recipe when it has one."""
    recipe = recipe_of(x)
    if recipe is None:
        return F.linear(x, A)
    producer, inputs = recipe
    # Detached: the inputs are only kept, not differentiated through (no extra graph edges);
    # detach shares storage and version counter, so an in-place change still raises in backward.
    return _DownProjection.apply(x, A, producer, *(t.detach() for t in inputs))


def _producer_types() -> tuple[type, ...]:
    from slime.backends.megatron_utils.swiglu import SwiGLU

    return (nn.RMSNorm, nn.LayerNorm, SwiGLU)


def _tag_output(module: nn.Module, args: tuple, output) -> None:
    if len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
        mark_recomputable(output, module, args[0])


def install_input_recompute(model: nn.Module) -> list[str]:
    """Tag the outputs of every norm and SwiGLU of ``model`` so adapters fed by them keep no input.

    Returns the dotted names of the producers hooked.  Hooking one twice is harmless (the
    second tag overwrites the first with the same recipe) but is skipped.
    """
    hooked, producer_types = [], _producer_types()
    for name, module in model.named_modules():
        if isinstance(module, producer_types) and not getattr(module, "_lora_recompute_hooked", False):
            module.register_forward_hook(_tag_output)
            module._lora_recompute_hooked = True
            hooked.append(name)
    return hooked
