"""The model shape, read from a Hugging Face ``config.json``, and its megatron-core config.

Supported families: Llama (incl. SmolLM2), Qwen2 (QKV bias), Qwen3 (q/k RMSNorm) and Qwen3-MoE.
They share one megatron-core layout: RMSNorm, SwiGLU MLP, grouped-query attention and RoPE.
In Qwen3-MoE every layer's MLP is a mixture of ``E`` SwiGLU experts of width ``I`` behind a
softmax router ``[E, h]`` that picks the top ``k`` per token: with ``p = softmax(router x)``
and ``S`` the ``k`` largest entries, ``y = sum_{e in S} w_e expert_e(x)``, ``w_e = p_e`` or,
with ``norm_topk_prob``, ``p_e / sum_{S} p``.
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
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
# Token dispatchers of megatron's MoE layer that we run: "allgather" needs only all-gather and
# reduce-scatter (gloo has both); "alltoall" is slime's choice on GPUs (NCCL).
MOE_DISPATCHERS: tuple[str, ...] = ("allgather", "alltoall")


def _moe_fields(config: dict, source: str) -> dict:
    """The MoE shape of a Qwen3-MoE config (zeros for a dense model); unsupported variants raise."""
    if (config.get("architectures") or [""])[0] != "Qwen3MoeForCausalLM":
        return {}
    # the hub's configs say num_experts; transformers 5 writes num_local_experts
    num_experts = config["num_experts"] if "num_experts" in config else config["num_local_experts"]
    problems = []
    if config.get("decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
        problems.append("decoder_sparse_step != 1 or mlp_only_layers set (dense layers between MoE layers)")
    if config.get("shared_expert_intermediate_size"):
        problems.append("shared experts")
    if problems:
        raise UserError(f"{source}: Qwen3-MoE with {' and '.join(problems)} is not supported; "
                        "every layer must be a mixture of experts")
    return {"num_experts": int(num_experts), "moe_topk": int(config["num_experts_per_tok"]),
            "moe_ffn_hidden_size": int(config["moe_intermediate_size"]),
            "moe_norm_topk_prob": bool(config.get("norm_topk_prob", False))}


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
    num_experts: int = 0  # 0: a dense model
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    moe_norm_topk_prob: bool = False

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

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
            qk_layernorm=family in ("qwen3", "qwen3_moe"),
            add_qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            **_moe_fields(config, source),
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
        fused ones: ``linear_qkv`` [(H + 2G) d, h], ``linear_fc1`` [2F, h] = [gate; up]).  An MoE
        layer has ``mlp.experts.local_experts.{e}.linear_fc1`` [2I, h] and ``linear_fc2`` [h, I]
        for every expert ``e`` (global indices) and a router that is not a linear layer."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_query_groups * self.head_dim
        h, f = self.hidden_size, self.ffn_hidden_size
        per_layer = {"self_attention.linear_qkv": (q + 2 * kv, h), "self_attention.linear_proj": (h, q)}
        if self.is_moe:
            i = self.moe_ffn_hidden_size
            for e in range(self.num_experts):
                per_layer[f"mlp.experts.local_experts.{e}.linear_fc1"] = (2 * i, h)
                per_layer[f"mlp.experts.local_experts.{e}.linear_fc2"] = (h, i)
        else:
            per_layer.update({"mlp.linear_fc1": (2 * f, h), "mlp.linear_fc2": (h, f)})
        return {f"decoder.layers.{i}.{name}": shape
                for i in range(self.num_layers) for name, shape in per_layer.items()}

    def tp_errors(self, tp_size: int) -> list[str]:
        errors = []
        for what, n in (("attention heads", self.num_attention_heads), ("query groups", self.num_query_groups)):
            if n % tp_size:
                errors.append(f"--tensor-model-parallel-size {tp_size} does not divide the model's {n} {what}")
        return errors

    def moe_errors(self, *, tp_size: int, ep_size: int, etp_size: int, sequence_parallel: bool,
                   dispatcher: str, on_gpu: bool) -> list[str]:
        """Problems of the expert-parallel flags for this model (dense models accept only the defaults)."""
        if not self.is_moe:
            if ep_size != 1 or etp_size != 1:
                return [f"--expert-model-parallel-size {ep_size} / --expert-tensor-parallel-size {etp_size}: "
                        "the model has no experts; leave both at 1"]
            return []
        errors = []
        if self.num_experts % ep_size:
            errors.append(f"--expert-model-parallel-size {ep_size} does not divide the model's {self.num_experts} experts")
        if etp_size != 1:
            errors.append(f"--expert-tensor-parallel-size {etp_size}: LoRA on experts needs whole experts per rank; "
                          "pass --expert-tensor-parallel-size 1 (as slime's MoE recipes do)")
        if tp_size > 1 and not sequence_parallel:
            errors.append(f"--tensor-model-parallel-size {tp_size} with a mixture-of-experts model needs "
                          "--sequence-parallel (megatron's MoE layer requires it under TP)")
        if dispatcher not in MOE_DISPATCHERS:
            errors.append(f"--moe-token-dispatcher-type {dispatcher!r}: use one of {', '.join(MOE_DISPATCHERS)}")
        elif dispatcher == "alltoall" and not on_gpu:
            errors.append("--moe-token-dispatcher-type alltoall needs CUDA; use allgather on CPUs")
        return errors

    def moe_config(self, *, ep_size: int = 1, dispatcher: str | None = None) -> dict:
        """megatron-core's MoE fields: experts in a loop (no grouped GEMM, no TransformerEngine),
        no auxiliary load-balancing loss (the router is frozen under LoRA, so the loss is the RL
        loss alone), router logits in fp32.  ``pre_softmax`` with ``norm_topk_prob`` off: the
        weights are the softmax over all experts; with it on, a softmax over the top-k logits,
        which equals the renormalised top-k of the full softmax."""
        if not self.is_moe:
            return {}
        return dict(
            num_moe_experts=self.num_experts, moe_router_topk=self.moe_topk, moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_grouped_gemm=False, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
            moe_router_pre_softmax=not self.moe_norm_topk_prob, moe_router_score_function="softmax",
            moe_router_dtype="fp32", moe_token_dispatcher_type=dispatcher or default_dispatcher(),
            expert_model_parallel_size=ep_size, expert_tensor_parallel_size=1, moe_permute_fusion=False,
        )

    def transformer_config(self, *, tp_size: int = 1, pp_size: int = 1, sequence_parallel: bool = False,
                           params_dtype: torch.dtype = torch.float32, recompute: bool = False,
                           init_weights: bool = True, ep_size: int = 1, dispatcher: str | None = None):
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
            **self.moe_config(ep_size=ep_size, dispatcher=dispatcher),
        )


def default_dispatcher() -> str:
    """alltoall on GPUs (slime's recipes), allgather on CPUs (gloo)."""
    return "alltoall" if torch.cuda.is_available() else "allgather"
