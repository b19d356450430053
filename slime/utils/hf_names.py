"""The one table of Megatron <-> Hugging Face module names (Llama/Qwen-style decoders).

Everything that names a module in both worlds reads it from here: weight conversion
(:mod:`slime.backends.megatron_utils.hf_convert`), the LoRA target names and their HF aliases
(:mod:`slime.utils.lora_config`), and the PEFT adapter export/import.  The fused Megatron
linears hold several HF projections: ``linear_qkv`` = q, k, v; ``linear_fc1`` = gate, up.
A mixture-of-experts layer (Qwen3-MoE) has megatron's router (HF ``mlp.gate``) and, per expert
``e``, ``mlp.experts.local_experts.{e}.linear_fc1`` / ``linear_fc2`` (HF ``mlp.experts.{e}.``
gate/up and down).  Names here carry the *global* expert index; a rank holding experts
``o .. o + E/EP - 1`` (expert parallelism) numbers them from 0 in its own modules.
"""

from __future__ import annotations

import re

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
    "mlp.router": ("mlp.gate",),  # MoE layers only
}
# Megatron modules outside the decoder layers -> HF modules.
MEGATRON_TO_HF_GLOBAL: dict[str, tuple[str, ...]] = {
    "embedding.word_embeddings": ("model.embed_tokens",),
    "decoder.final_layernorm": ("model.norm",),
    "output_layer": ("lm_head",),
}
HF_LAYER_PREFIX = "model.layers"
MOE_ROUTER = "mlp.router"
EXPERT_PREFIX = "mlp.experts.local_experts."
_EXPERT_MODULE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)$")
_HF_EXPERT_MODULE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")

# The per-layer linear modules (LoRA's targets), in layer order.
LINEAR_MODULES: tuple[str, ...] = tuple(m for m in MEGATRON_TO_HF_LAYER if m.rsplit(".", 1)[-1].startswith("linear_"))


def leaf(name: str) -> str:
    """The attribute name of a dotted module name: ``self_attention.linear_qkv`` -> ``linear_qkv``."""
    return name.rsplit(".", 1)[-1]


def split_expert(module: str) -> tuple[int, str] | None:
    """``mlp.experts.local_experts.3.linear_fc1`` -> ``(3, "mlp.linear_fc1")`` (the dense module of
    the same layout); ``None`` for a module that is not an expert's linear."""
    match = _EXPERT_MODULE.match(module)
    return (int(match[1]), f"mlp.{match[2]}") if match else None


def expert_module(expert: int, dense_module: str) -> str:
    """Inverse of :func:`split_expert`: ``(3, "mlp.linear_fc1")`` -> ``mlp.experts.local_experts.3.linear_fc1``."""
    return f"{EXPERT_PREFIX}{expert}.{leaf(dense_module)}"


def hf_expert_modules(expert: int, dense_module: str) -> tuple[str, ...]:
    """HF modules of expert ``expert``'s ``dense_module``: ``mlp.experts.3.gate_proj``, ``mlp.experts.3.up_proj``."""
    return tuple(f"mlp.experts.{expert}.{leaf(hf)}" for hf in MEGATRON_TO_HF_LAYER[dense_module])


def hf_expert_index(hf_module: str) -> int | None:
    """``mlp.experts.3.down_proj`` (per-layer HF name) -> 3; ``None`` for any other module."""
    match = _HF_EXPERT_MODULE.match(hf_module)
    return int(match[1]) if match else None
