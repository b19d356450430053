"""The model shape, read from a Hugging Face ``config.json``, and its megatron-core config.

Supported families: Llama (incl. SmolLM2), Qwen2 (QKV bias) and Qwen3 (q/k RMSNorm).  They
share one megatron-core layout: RMSNorm, SwiGLU MLP, grouped-query attention and RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from slime.utils.errors import UserError, read_json_file

# HF ``architectures[0]`` -> our family name.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class ModelArch:
    """Everything megatron-core needs to build the network (not the weights)."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    qk_layernorm: bool
    add_qkv_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, config: dict, source: str = "config.json") -> "ModelArch":
        archs = config.get("architectures") or []
        family = SUPPORTED_ARCHITECTURES.get(archs[0]) if archs else None
        if family is None:
            raise UserError(
                f"{source}: architecture {archs[0] if archs else config.get('model_type')!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope_scaling = config.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise UserError(f"{source}: rope_scaling {rope_scaling} is not supported; use a checkpoint without it")
        if config.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (only silu)")
        heads = config["num_attention_heads"]
        rope_theta = config.get("rope_theta")
        if rope_theta is None:  # transformers 5 nests it under rope_parameters
            rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            family=family,
            num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"],
            ffn_hidden_size=config["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            qk_layernorm=family == "qwen3",
            add_qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "ModelArch":
        path = Path(checkpoint_dir) / "config.json"
        missing = f"--hf-checkpoint {checkpoint_dir}: no config.json there; point it at a Hugging Face model directory"
        return cls.from_hf_config(read_json_file(path, missing=missing), source=str(path))

    def padded_vocab_size(self, tp_size: int) -> int:
        """The vocabulary rounded up to a multiple of TP; padded logits are masked out."""
        return -(-self.vocab_size // tp_size) * tp_size

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(out, in)`` of every per-layer linear of the megatron-core model, by dotted name (the
        fused ones: ``linear_qkv`` [(H + 2G) d, h], ``linear_fc1`` [2F, h] = [gate; up])."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_query_groups * self.head_dim
        h, f = self.hidden_size, self.ffn_hidden_size
        per_layer = {"self_attention.linear_qkv": (q + 2 * kv, h), "self_attention.linear_proj": (h, q),
                     "mlp.linear_fc1": (2 * f, h), "mlp.linear_fc2": (h, f)}
        return {f"decoder.layers.{i}.{name}": shape
                for i in range(self.num_layers) for name, shape in per_layer.items()}

    def tp_errors(self, tp_size: int) -> list[str]:
        errors = []
        for what, n in (("attention heads", self.num_attention_heads), ("query groups", self.num_query_groups)):
            if n % tp_size:
                errors.append(f"--tensor-model-parallel-size {tp_size} does not divide the model's {n} {what}")
        return errors

    def transformer_config(self, *, tp_size: int = 1, pp_size: int = 1, sequence_parallel: bool = False,
                           params_dtype: torch.dtype = torch.float32, recompute: bool = False,
                           init_weights: bool = True):
        """megatron-core's TransformerConfig for this shape (CPU-safe: no fused kernels)."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        on_gpu = torch.cuda.is_available()
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=tp_size,
            pipeline_model_parallel_size=pp_size,
            sequence_parallel=sequence_parallel and tp_size > 1,
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            pipeline_dtype=params_dtype,
            use_cpu_initialization=not on_gpu,
            perform_initialization=init_weights,
            gradient_accumulation_fusion=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            masked_softmax_fusion=on_gpu,
            persist_layer_norm=False,
            recompute_granularity="full" if recompute else None,
            recompute_method="uniform" if recompute else None,
            recompute_num_layers=1 if recompute else None,
        )
