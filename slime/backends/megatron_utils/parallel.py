"""torch.distributed and megatron-core parallel state for one training process."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from slime.backends.megatron_utils.cpu_compat import apply_cpu_compat


def init_parallel(
    rank: int,
    world_size: int,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 1234,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and build TP/PP/DP groups.

    ``world_size = TP x PP x DP``; megatron orders ranks TP-fastest, so TP peers are
    neighbours (the same node on a real cluster).
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
        parallel_state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
