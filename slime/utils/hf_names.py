"""The one table of Megatron <-> Hugging Face module names (Llama/Qwen-style decoders).

Everything that names a module in both worlds reads it from here: weight conversion
(:mod:`slime.backends.megatron_utils.hf_convert`), the LoRA target names and their HF aliases
(:mod:`slime.utils.lora_config`), and the PEFT adapter export/import.  The fused Megatron
linears hold several HF projections: ``linear_qkv`` = q, k, v; ``linear_fc1`` = gate, up.
"""

from __future__ import annotations

# Per-layer Megatron module (under ``decoder.layers.N.``) -> HF modules (under ``model.layers.N.``).
MEGATRON_TO_HF_LAYER: dict[str, tuple[str, ...]] = {
    "input_layernorm": ("input_layernorm",),
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.q_layernorm": ("self_attn.q_norm",),
    "self_attention.k_layernorm": ("self_attn.k_norm",),
    "self_attention.linear_proj": ("self_attn.o_proj",),
    "pre_mlp_layernorm": ("post_attention_layernorm",),
    "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.linear_fc2": ("mlp.down_proj",),
}
# Megatron modules outside the decoder layers -> HF modules.
MEGATRON_TO_HF_GLOBAL: dict[str, tuple[str, ...]] = {
    "embedding.word_embeddings": ("model.embed_tokens",),
    "decoder.final_layernorm": ("model.norm",),
    "output_layer": ("lm_head",),
}
HF_LAYER_PREFIX = "model.layers"

# The per-layer linear modules (LoRA's targets), in layer order.
LINEAR_MODULES: tuple[str, ...] = tuple(m for m in MEGATRON_TO_HF_LAYER if m.rsplit(".", 1)[-1].startswith("linear_"))


def leaf(name: str) -> str:
    """The attribute name of a dotted module name: ``self_attention.linear_qkv`` -> ``linear_qkv``."""
    return name.rsplit(".", 1)[-1]
