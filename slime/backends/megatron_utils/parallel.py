"""torch.distributed and megatron-core parallel state: joining the world, and where a process sits in it."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from slime.backends.megatron_utils.cpu_compat import apply_cpu_compat


def init_parallel(
    rank: int,
    world_size: int,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    seed: int = 1234,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and build TP/PP/DP groups.

    ``world_size = TP x PP x DP``; megatron orders ranks TP-fastest, so TP peers are
    neighbours (the same node on a real cluster).  Experts (MoE) are split over
    ``expert_parallel`` (EP) ranks taken within ``world_size / PP``, each expert whole (expert
    TP = 1); the ranks holding the same experts form the expert-data-parallel group.
    """
    apply_cpu_compat()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = master_port or int(os.environ.get("MASTER_PORT", "29500"))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo",
            init_method=f"tcp://{addr}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=30),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_parallel, pipeline_parallel,
                                                 expert_model_parallel_size=expert_parallel,
                                                 expert_tensor_parallel_size=1)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- parallel-state helpers
# The one home of "where am I in the parallel layout" questions; each answers for a process
# without torch.distributed or megatron's parallel state too (rank 0 of a world of 1).


def _megatron_parallel_ready() -> bool:
    if not dist.is_initialized():
        return False
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized()


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def global_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    return global_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def tp_group_rank_size() -> tuple[object | None, int, int]:
    """(group, rank, size) of this process's tensor-parallel group; ``(None, 0, 1)`` outside one."""
    if not _megatron_parallel_ready():
        return None, 0, 1
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    return group, dist.get_rank(group), dist.get_world_size(group)


def tp_rank_size() -> tuple[int, int]:
    _, rank, size = tp_group_rank_size()
    return rank, size


def expert_groups() -> tuple[object | None, object | None, object | None]:
    """(expert-parallel, expert-data-parallel, expert model-parallel = EP x PP) groups of this
    process; ``None``s outside megatron's parallel state."""
    if not _megatron_parallel_ready():
        return None, None, None
    from megatron.core import parallel_state

    return (parallel_state.get_expert_model_parallel_group(), parallel_state.get_expert_data_parallel_group(),
            parallel_state.get_expert_tensor_model_pipeline_parallel_group())


def group_rank_size(group: object | None) -> tuple[int, int]:
    """(rank, size) in ``group``; ``(0, 1)`` for no group or no process group."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def pp_group() -> object | None:
    """This process's pipeline-parallel group, ``None`` outside megatron's parallel state."""
    if not _megatron_parallel_ready():
        return None
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


def unwrap_model(module: nn.Module) -> nn.Module:
    """Strip DDP / Float16Module-style wrappers (anything holding the model in ``.module``)."""
    while isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    return module


def gather_vocab(logits_local: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Vocab-parallel logits ``[..., V_padded / T]`` -> ``[..., V_padded]`` (``[..., vocab_size]``
    when given: the TP padding columns dropped).  Differentiable: megatron's all-gather, whose
    backward keeps this rank's slice of the gradient."""
    if tp_rank_size()[1] > 1:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits_local = gather_from_tensor_model_parallel_region(logits_local)
    return logits_local if vocab_size is None else logits_local[..., :vocab_size]


def gather_over_group(part: dict[str, torch.Tensor], group: object | None) -> dict[str, torch.Tensor]:
    """Every member's part of a name -> tensor dict, merged, on every member of ``group`` (collective)."""
    if group is None or dist.get_world_size(group) == 1:
        return part
    parts: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, part, group=group)
    merged: dict[str, torch.Tensor] = {}
    for member in parts:
        merged.update(member or {})
    return merged


def gather_pipeline_stages(stage_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every pipeline stage's part of a name -> tensor dict, merged, on every stage (collective)."""
    return gather_over_group(stage_dict, pp_group())
