"""The up-projection of a LoRA layer fused with the sum into the base output.

``out + s * h @ B^T`` costs one ``addmm`` over the ``[tokens, out]`` output instead of a matmul,
a scale and a sum (three passes over the largest tensor of the layer on a CPU); the caller
decides whether ``out`` may be overwritten (see ``LoRALinear.add_delta``).
"""

from __future__ import annotations

import torch


class AddScaledUpProjection(torch.autograd.Function):
    """``out + s * h @ B^T``, written into ``out`` when ``inplace``; ``out [..., o]``, ``h [..., r]``, ``B [o, r]``.

    Backward with ``g = dL/d out`` flattened to ``[N, o]``:
    ``dL/dh = s * g @ B`` ``[N, r]`` and ``dL/dB = s * (h^T @ g)^T`` ``[o, r]``; ``out`` passes
    ``g`` through.  ``h^T @ g`` streams ``g`` along its rows, about twice as fast on CPU BLAS as
    ``g^T @ h`` when ``N >> r``; the scale lands on the small ``[N, r]`` / ``[r, o]`` products.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scaling: float, inplace: bool) -> torch.Tensor:
        ctx.save_for_backward(h, B)
        ctx.scaling = scaling
        flat_out, flat_h = out.view(-1, out.shape[-1]), h.reshape(-1, h.shape[-1])
        if not inplace:  # a fresh tensor, not a view of one (callers may write into it)
            new = torch.empty_like(out, memory_format=torch.contiguous_format)
            torch.addmm(flat_out, flat_h, B.t(), alpha=scaling, out=new.view(-1, out.shape[-1]))
            return new
        flat_out.addmm_(flat_h, B.t(), alpha=scaling)
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        h, B = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        h2 = h.reshape(-1, h.shape[-1])
        grad_h = torch.mm(g2, B).mul_(ctx.scaling).view(h.shape) if ctx.needs_input_grad[1] else None
        grad_B = torch.mm(h2.t(), g2).mul_(ctx.scaling).t() if ctx.needs_input_grad[2] else None
        return g, grad_h, grad_B, None, None
