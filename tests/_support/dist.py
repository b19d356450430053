"""Run a function in N real processes joined by torch.distributed (gloo) + megatron parallel state.

``run_distributed(fn, world_size, tp=..., ep=..., args=(...))`` spawns ``world_size`` processes, each
calling ``fn(rank, *args)`` after ``init_parallel``; it returns the list of per-rank return
values (which must be picklable).  Any failure in a worker fails the test with its traceback.
"""

from __future__ import annotations

import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, tp, pp, ep, port, fn, args, queue):
    try:
        import torch

        torch.set_num_threads(1)
        mp.set_sharing_strategy("file_system")  # the sender picks how tensors travel (see run_distributed)
        from slime.backends.megatron_utils.parallel import destroy_parallel, init_parallel

        init_parallel(rank, world_size, tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep, master_port=port)
        result = fn(rank, *args)
        queue.put((rank, "ok", result))
        destroy_parallel()
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, world_size: int, *, tp: int | None = None, pp: int = 1, ep: int = 1, args: tuple = (),
                    timeout: float = 300):
    # Tensors in results travel as shared-memory files, not as file descriptors that vanish when the
    # worker exits before the parent has unpickled them (a FileNotFoundError race).
    mp.set_sharing_strategy("file_system")
    tp = world_size if tp is None else tp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, tp, pp, ep, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    for _ in procs:
        rank, status, payload = queue.get(timeout=timeout)
        if status == "error":
            errors.append(f"rank {rank}:\n{payload}")
        results[rank] = payload
        if errors:
            break
    for p in procs:
        p.join(timeout=10 if not errors else 1)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
