"""megatron-core's local core attention, computed by ``torch.nn.functional.scaled_dot_product_attention``.

The local spec's ``DotProductAttention`` materialises the ``[b, heads, s, s]`` scores and
probabilities with strided ``baddbmm``/``bmm`` calls; on CPUs that path takes ~28% of a LoRA
train step (measured with torch.profiler on SmolLM2-135M) and it keeps both tensors for
backward.  This subclass keeps megatron's interface and head partitioning (it is a drop-in
``core_attention`` in the layer spec) and hands the math to PyTorch's fused kernel.

Shapes: ``query [sq, b, heads/tp, d]``, ``key, value [sk, b, groups/tp, d]``; the mask is
megatron's (``True`` = masked out, ``[b or 1, 1, sq, sk]``) or ``None`` for plain causal.
Returns ``[sq, b, heads/tp * d]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPADotProductAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPADotProductAttention supports neither packed_seq_params nor attention_bias")
        if self.config.window_size is not None or self.softmax_offset is not None:
            raise NotImplementedError("SDPADotProductAttention supports neither sliding windows nor softmax offsets")
        if torch.is_grad_enabled() and value.untyped_storage().nbytes() > value.numel() * value.element_size():
            # value is a view into the fused qkv projection's output; saved as is, it would keep
            # that whole buffer alive until backward (q and k are fresh tensors after RoPE).
            value = value.clone(memory_format=torch.contiguous_format)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        causal = attention_mask is None and q.shape[2] == k.shape[2]
        context = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=None if attention_mask is None else ~attention_mask,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
            is_causal=causal,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
