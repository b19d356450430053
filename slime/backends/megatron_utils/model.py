"""Build the megatron-core policy, put LoRA in it, and its optimizer.

The order is the point:

    model provider (GPTModel per chunk) -> LoRA wrap + freeze -> load base weights
        -> optimizer over requires_grad parameters

LoRA enters in :func:`get_model`, before any gradient buffer or optimizer state exists, and
base weights load afterwards under their original names (``LoRALinear`` maps them).
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from slime.backends.megatron_utils.arch import ModelArch
from slime.backends.megatron_utils.optimizer import LRSchedule, TrainOptimizer
from slime.utils.lora_config import LoraConfig


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float32


def model_provider(args: argparse.Namespace, arch: ModelArch, *, pre_process: bool = True,
                   post_process: bool = True, vp_stage: int | None = None) -> nn.Module:
    """One megatron-core GPTModel chunk with the local (non-TransformerEngine) layer spec."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from slime.backends.megatron_utils.sdpa_attention import SDPADotProductAttention
    from slime.backends.megatron_utils.swiglu import SwiGLU

    tp = args.tensor_model_parallel_size
    config = arch.transformer_config(
        tp_size=tp, pp_size=args.pipeline_model_parallel_size, sequence_parallel=args.sequence_parallel,
        params_dtype=params_dtype(args), recompute=args.recompute_activations,
        init_weights=args.hf_checkpoint is None, ep_size=getattr(args, "expert_model_parallel_size", 1),
        dispatcher=getattr(args, "moe_token_dispatcher_type", None),
    )
    spec = get_gpt_layer_local_spec(num_experts=arch.num_experts or None, moe_grouped_gemm=False,
                                    qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    if config.gated_linear_unit and config.activation_func is F.silu:
        # megatron's hook for a module-valued activation (named after TE, but any module works):
        # the module gets the whole [.., 2F] fc1 output and keeps 1 tensor for backward, not 4.
        config.use_te_activation_func = True
        mlp = spec.submodules.mlp.submodules
        (mlp.experts.submodules if arch.is_moe else mlp).activation_func = SwiGLU
    if config.sequence_parallel:
        from slime.backends.megatron_utils.sp_norm import use_sequence_parallel_norms

        # megatron's torch-norm fallback refuses SP; ours tags the weights whose gradients are partial.
        spec = use_sequence_parallel_norms(spec, config, vp_stage)
    model = GPTModel(
        config, spec, vocab_size=arch.padded_vocab_size(tp), max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process, post_process=post_process, parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings, position_embedding_type="rope",
        rotary_base=arch.rope_theta, vp_stage=vp_stage,
    )
    _tag_parallel_weights(model, tp)
    return model


def _tag_parallel_weights(model: nn.Module, tp: int) -> None:
    """Tag weights the way the optimizer's grad norm and TP reductions read them, as megatron does.

    * TP shards: megatron sets ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride``
      only inside ``_initialize_affine_weight_*``, which is skipped when the weights come from a
      checkpoint (``perform_initialization=False``).  Untagged, a shard looks replicated: the
      global grad norm would count it on TP rank 0 only (full fine-tuning at TP=2 would clip with
      a wrong norm) and the banner's parameter total would count it once.  Vocabulary embedding and
      column-parallel weights ``[out/tp, in]`` are split along dim 0, row-parallel ``[out, in/tp]``
      along dim 1.
    * q/k norms (Qwen3): one weight ``[head_dim]``, replicated, applied to this rank's heads only,
      so its gradient is a partial sum over TP (megatron's ``finalize_model_grads`` sums them by
      name).  Tagged ``sequence_parallel``, the optimizer's tag for exactly that: without it each
      rank would step its replica with its own partial gradient and the replicas would drift apart.
    * MoE experts: ``allreduce = False`` on every expert parameter, whatever the EP size (megatron
      sets it only when EP > 1, but at TP > 1 with whole experts the TP ranks' expert gradients
      are partial too); experts are never TP-split here (expert TP = 1).
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for name, module in model.named_modules():
        if getattr(module, "is_expert", False):
            for param in module.parameters(recurse=False):
                param.allreduce = False  # see optimizer.py: reduced over the expert-data-parallel group
            continue
        if tp > 1 and name.rsplit(".", 1)[-1] in ("q_layernorm", "k_layernorm"):
            for param in module.parameters():
                param.sequence_parallel = True
            continue
        if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)  # None: an output layer that shares the embedding's
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)


def get_model(args: argparse.Namespace, arch: ModelArch, lora: LoraConfig | None = None) -> list[nn.Module]:
    """All chunks of this rank, with LoRA already in place when ``lora`` is given (one adapter per
    ``args.tasks`` entry when there are tasks)."""
    from megatron.core import parallel_state

    chunks = [model_provider(args, arch, pre_process=parallel_state.is_pipeline_first_stage(),
                             post_process=parallel_state.is_pipeline_last_stage())]
    if torch.cuda.is_available():
        # As megatron's own get_model does: megatron creates its parallel layers on the current
        # device, but plain torch modules of the local spec (torch.nn.RMSNorm, used when Apex is
        # absent) are built on the CPU. Moved before LoRA, so the adapters are created on the GPU.
        device = torch.cuda.current_device()
        chunks = [chunk.cuda(device) for chunk in chunks]
    if lora is not None:
        from slime_plugins.lora.megatron_lora_hook import apply_lora_to_megatron_model

        tasks = getattr(args, "tasks", None) or []
        chunks = apply_lora_to_megatron_model(chunks, lora, {t.name: t.lora for t in tasks} or None)
        if args.recompute_activations:
            for chunk in chunks:
                _let_gradients_through_recompute(chunk)
    return chunks


def _let_gradients_through_recompute(chunk: nn.Module) -> None:
    """megatron's (reentrant) activation checkpointing returns outputs that need no gradient
    when its input needs none, which is the case after a frozen embedding: the adapters in the
    recomputed layers would then never be trained. Marking the embedding output fixes that."""
    embedding = getattr(chunk, "embedding", None)
    if embedding is not None:
        embedding.register_forward_hook(lambda module, inputs, output: output.requires_grad_(True))


class ModelAndOptimizer(NamedTuple):
    """``optimizers``: adapter name -> its optimizer (one per ``--lora-tasks`` task; otherwise one,
    under ``default``, over every trainable parameter); empty for a frozen reference model."""

    model: list[nn.Module]
    optimizers: dict[str, TrainOptimizer]
    arch: ModelArch

    @property
    def optimizer(self) -> TrainOptimizer | None:
        """The run's one optimizer (``None`` for a frozen model); a several-task run has one per task."""
        if len(self.optimizers) > 1:
            raise AttributeError("several adapters, one optimizer each: use .optimizers[name]")
        return next(iter(self.optimizers.values()), None)


def build_optimizer(args: argparse.Namespace, chunks: list[nn.Module],
                    params: list[nn.Parameter] | None = None) -> TrainOptimizer:
    """AdamW + the LR schedule of the flags (``args`` may be a task's view: its own ``lr``)."""
    schedule = LRSchedule(lr=args.lr, min_lr=min(args.min_lr, args.lr), warmup_iters=args.lr_warmup_iters,
                          decay_style=args.lr_decay_style, decay_iters=args.lr_decay_iters)
    return TrainOptimizer(chunks, schedule, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                          eps=args.adam_eps, clip_grad=args.clip_grad, params=params)


def build_optimizers(args: argparse.Namespace, chunks: list[nn.Module]) -> dict[str, TrainOptimizer]:
    """One optimizer per adapter: its own AdamW state, LR schedule, grad norm and clipping."""
    tasks = getattr(args, "tasks", None) or []
    if not tasks:
        from slime_plugins.lora.lora_layer import DEFAULT_ADAPTER

        return {DEFAULT_ADAPTER: build_optimizer(args, chunks)}
    from slime.utils.tasks import task_args
    from slime_plugins.lora.lora_layer import adapter_parameters

    return {t.name: build_optimizer(task_args(args, t), chunks, adapter_parameters(chunks, t.name)) for t in tasks}


def initialize_model_and_optimizer(args: argparse.Namespace, role: str = "actor",
                                   arch: ModelArch | None = None) -> ModelAndOptimizer:
    """Model chunks (LoRA inside), base weights loaded, optimizer over the trainable parameters.

    ``role="ref"`` builds a frozen model without LoRA or optimizer (the full-parameter KL
    reference).  LoRA comes from ``args.lora``, the run's :class:`LoraConfig` (``None``: full
    fine-tuning).
    """
    if arch is None:
        arch = ModelArch.from_checkpoint(args.hf_checkpoint)
    lora = args.lora if role == "actor" else None
    chunks = get_model(args, arch, lora)
    checkpoint = args.hf_checkpoint if role == "actor" else (args.ref_load or args.hf_checkpoint)
    if checkpoint is not None:
        from slime.backends.megatron_utils.hf_convert import load_hf_weights

        load_hf_weights(chunks, arch, checkpoint)
    if role != "actor":
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        return ModelAndOptimizer(chunks, {}, arch)
    if lora is not None and lora.adapter_path:
        from slime_plugins.lora.peft_io import load_peft_adapter

        load_peft_adapter(chunks, arch, lora.adapter_path, lora)
    return ModelAndOptimizer(chunks, build_optimizers(args, chunks), arch)
