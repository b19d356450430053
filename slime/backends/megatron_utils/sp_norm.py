"""RMSNorm for megatron-core's local layer spec that also runs under sequence parallelism.

Without Apex or TransformerEngine the local spec builds its norms with ``WrappedTorchNorm``
(``torch.nn.RMSNorm``), which refuses ``sequence_parallel``.  Under sequence parallelism each
TP rank normalises only its slice ``x [s/tp, b, h]`` of the sequence; the forward,

    y = g * x / sqrt(mean(x^2) + eps)        (per token, ``g [h]`` replicated over TP),

needs nothing from the other ranks, but the weight's gradient ``dL/dg = sum_tokens dy * x /
rms(x)`` then covers this rank's tokens only: a partial sum over the TP group.  megatron's fused
norms tag such weights ``sequence_parallel = True``, and so does this one, so that
:class:`~slime.backends.megatron_utils.optimizer.TrainOptimizer` sums their gradients over TP.
The q/k norms (Qwen3) see all tokens but only this rank's heads, so their gradient is a partial
sum over TP as well, and they carry the same tag.

:func:`use_sequence_parallel_norms` puts this class in every norm slot of a layer spec and
returns the block spec that also gives it to the final norm.
"""

from __future__ import annotations

from torch import nn


class SequenceParallelRMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` built from megatron's norm arguments; weight tagged for SP (see module docstring)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm") -> None:
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise NotImplementedError("SequenceParallelRMSNorm is a plain RMSNorm (no LayerNorm, no zero-centred gamma)")
        # Built as WrappedTorchNorm builds it (default dtype and device; the model moves it), so
        # checkpoints and outputs are those of the non-SP model.
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def use_sequence_parallel_norms(layer_spec, config, vp_stage: int | None = None):
    """Put :class:`SequenceParallelRMSNorm` into ``layer_spec``'s norm slots, in place; return the
    ``TransformerBlockSubmodules`` (this stage's layers plus the final norm) to build the model from."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = layer_spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = SequenceParallelRMSNorm
    attention = layer.self_attention.submodules
    for slot in ("q_layernorm", "k_layernorm"):
        if getattr(attention, slot) is not IdentityOp:
            setattr(attention, slot, SequenceParallelRMSNorm)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=SequenceParallelRMSNorm)

