"""Put LoRA into a megatron-core model: wrap the targets, freeze the base, log what happened.

Called from the model provider (``slime.backends.megatron_utils.model.get_model``) on the
freshly built chunks, before any DDP wrapper, gradient buffer or optimizer exists, so the
optimizer only ever sees the adapter parameters.
"""

from __future__ import annotations

import argparse
import re
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from slime.backends.megatron_utils.hf_convert import whole_model_name
from slime.backends.megatron_utils.optimizer import is_expert_param
from slime.backends.megatron_utils.parallel import expert_groups, is_rank0, pp_group, tp_rank_size, unwrap_model
from slime.utils.errors import UserError
from slime.utils.lora_config import LoraConfig
from slime_plugins.lora.input_recompute import install_input_recompute
from slime_plugins.lora.lora_layer import DEFAULT_ADAPTER, add_adapter, apply_lora_to_model

_RULE = "=" * 80
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _log(message: str = "") -> None:
    if is_rank0():
        print(message, flush=True)


def _global_param_counts(chunks: Sequence[nn.Module]) -> tuple[int, int]:
    """(total, trainable) over the whole model: TP shards, PP stages and expert-parallel ranks'
    experts summed, replicas once."""
    dense, experts = [0, 0], [0, 0]
    tp_size = tp_rank_size()[1]
    for chunk in chunks:
        for p in chunk.parameters():
            counts = experts if is_expert_param(p) else dense
            n = p.numel() * (tp_size if getattr(p, "tensor_model_parallel", False) else 1)
            counts[0] += n
            counts[1] += n if p.requires_grad else 0
    return tuple(a + b for a, b in zip(_sum_over(dense, pp_group()), _sum_over(experts, expert_groups()[2])))


def _sum_over(counts: list[int], group) -> list[int]:
    if group is None or dist.get_world_size(group) == 1:
        return counts
    # NCCL (GPU runs) reduces CUDA tensors only; gloo reduces CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    summed = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(summed, group=group)
    return [int(c) for c in summed.tolist()]


def _log_applied(chunk_index: int, names: list[str], verbose: bool) -> None:
    _log(f"\nApplying LoRA to model chunk {chunk_index}...")
    first_layer = min((int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))), default=None)
    hidden = 0
    for name in names:
        match = _LAYER_INDEX.search(name)
        if verbose or match is None or int(match.group(1)) == first_layer:
            _log(f"Applied LoRA to: {name}")
        else:
            hidden += 1
    if hidden:
        _log(f"... and {hidden} more modules in later layers (--lora-verbose lists them)")


def apply_lora_to_megatron_model(model: nn.Module | list[nn.Module], config: LoraConfig | argparse.Namespace,
                                 adapters: Mapping[str, LoraConfig] | None = None) -> list[nn.Module]:
    """Wrap ``config.targets`` of every chunk in LoRA and freeze the rest.

    ``adapters``: several named adapters on the one base (``--lora-tasks``: task name -> that
    task's config, which differs from ``config`` in ``r`` and ``alpha`` at most); without it, one
    adapter named ``default``.  Every adapter starts from the same seed, as a one-task run would.

    ``model`` is a list of chunks (virtual pipeline stages) or one module; wrappers are
    unwrapped.  ``config`` is the run's :class:`~slime.utils.lora_config.LoraConfig` (parsed
    flags are accepted too and read once, here).  With ``only_trainable`` (the default) every
    non-LoRA parameter gets ``requires_grad=False``; with ``recompute_input`` the norms and
    SwiGLUs tag their outputs so that adapters recompute their input in backward instead of
    keeping it.  Returns the list of chunks.
    """
    if not isinstance(config, LoraConfig):
        config = LoraConfig.from_args(config)
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    adapters = dict(adapters or {DEFAULT_ADAPTER: config})
    first, *others = adapters
    config = adapters[first]
    _log_config(config, adapters)
    for index, chunk in enumerate(chunks):
        inner = unwrap_model(chunk)
        try:
            names = apply_lora_to_model(inner, config.targets, config.r, config.alpha, config.dropout,
                                        use_rslora=config.use_rslora, init_seed=config.init_seed, adapter=first,
                                        whole_name=whole_model_name(inner))
            for name in others:
                add_adapter(inner, name, adapters[name].r, adapters[name].alpha, adapters[name].init_seed)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        _log_applied(index, names, config.verbose)
        if config.recompute_input:
            producers = install_input_recompute(inner)
            _log(f"Adapter inputs recomputed in backward from {len(producers)} norm/SwiGLU outputs")
        if config.only_trainable:
            for name, param in inner.named_parameters():
                param.requires_grad_(".lora_A" in name or ".lora_B" in name or name in ("lora_A", "lora_B"))
    total, trainable = _global_param_counts(chunks)
    _log()
    _log(_RULE)
    _log("LoRA applied successfully!")
    _log(f"  - Total parameters: {total:,}")
    _log(f"  - Trainable parameters: {trainable:,}")
    _log(f"  - Trainable %: {100.0 * trainable / max(total, 1):.2f}%")
    _log(_RULE)
    return chunks


def _log_config(config: LoraConfig, adapters: Mapping[str, LoraConfig]) -> None:
    _log(_RULE)
    _log("Applying LoRA to model...")
    _log(_RULE)
    _log("LoRA Configuration:")
    if len(adapters) > 1 or DEFAULT_ADAPTER not in adapters:
        _log(f"  - Adapters: {', '.join(f'{n} (r={c.r}, alpha={c.alpha:g})' for n, c in adapters.items())}")
    _log(f"  - Rank (r): {config.r}")
    _log(f"  - Alpha: {config.alpha}")
    _log(f"  - Dropout: {config.dropout}")
    _log(f"  - Target modules: {config.targets}")
    _log(f"  - Scaling: {'alpha / sqrt(r)' if config.use_rslora else 'alpha / r'}")
    _log(_RULE)
