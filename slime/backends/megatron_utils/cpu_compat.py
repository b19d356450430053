"""Run megatron-core on a machine without CUDA.

megatron-core assumes a CUDA device in a handful of places: it asks
``torch.cuda.current_device()`` for the device of new tensors, and its
model-parallel RNG tracker saves and restores CUDA generator states.  On a
CPU-only machine we route both to the CPU: the current device becomes
``torch.device("cpu")`` and the tracker forks the CPU generator instead.

The unfused softmax's default causal mask, built with ``device="cuda"``, is
rebuilt on the CPU as well, and activation recomputation saves and restores the
CPU generator where it would save the CUDA one.  The pipeline schedules count
tokens in a ``torch.zeros(..., device="cuda")`` and the point-to-point layer
calls ``torch.cuda.synchronize()`` after gloo's (already completed) transfers:
the schedules module sees a ``torch`` whose ``zeros`` puts "cuda" tensors on the
CPU, and synchronising a device that does not exist is a no-op.

megatron-core wraps its fused elementwise kernels (bias + GeLU/SwiGLU, ...) in
``torch.compile`` when it is imported, which loads TorchDynamo and Inductor into
the process (~1.2 s and +80 MiB right after the import, most of it transient: the
benchmark's peak moved by 13 MiB) for kernels the CPU layer spec never calls.  Without CUDA, megatron is imported with
its own no-op decorator in place of ``torch.compile`` (what its
``disable_jit_fuser`` selects, which cannot run before megatron's own import).

Everything here is applied by :func:`apply_cpu_compat` and only when
``torch.cuda.is_available()`` is false; on GPU machines nothing is touched but one name:
megatron's MoE router tests ``te_general_gemm is not None`` but defines that name only when
TransformerEngine imports, so without TransformerEngine (any CPU, and GPUs without it) the name
is set to ``None``, which selects megatron's own ``torch.mm`` path.
"""

from __future__ import annotations

import contextlib
import sys

import torch

_APPLIED = False


class CpuRNGStatesTracker:
    """Named RNG streams on the CPU generator, with megatron's tracker interface.

    Each ``add(name, seed)`` records a CPU generator state seeded with ``seed``;
    ``fork(name)`` swaps that state in for the duration of the block and saves
    the advanced state back, exactly what megatron's CUDA tracker does with
    CUDA generators (so dropout in TP regions differs per rank, as on GPUs).
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"rng seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator().manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def apply_cpu_compat() -> bool:
    """Patch megatron-core for CPU execution; return True when patches are active."""
    global _APPLIED
    if torch.cuda.is_available():
        _define_missing_te_names()
        return False
    if _APPLIED:
        return True
    _import_megatron_without_compiled_fusions()
    _define_missing_te_names()
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    # megatron seeds the "default" CUDA generator next to its tracker; without
    # CUDA these calls would be no-ops at best, so make them seed nothing.
    torch.cuda.manual_seed = lambda seed: None  # type: ignore[assignment]
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker  # type: ignore[misc]
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.initialize_rng_tracker = _keep_cpu_tracker
    # Activation recomputation saves and restores the "CUDA" generator around each layer.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # The unfused softmax builds its default causal mask with device="cuda".
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    tutils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchWithCpuZeros()
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    _APPLIED = True
    return True


def _import_megatron_without_compiled_fusions() -> None:
    if "megatron.core" in sys.modules:
        return
    compile_ = torch.compile

    def no_compile(model=None, **kwargs):
        return model if model is not None else (lambda fn: fn)

    torch.compile = no_compile  # type: ignore[assignment]
    try:
        import megatron.core  # noqa: F401
        from megatron.core import jit
    finally:
        torch.compile = compile_  # type: ignore[assignment]
    jit.disable_jit_fuser()  # modules imported later decorate with megatron's no-op too


class _TorchWithCpuZeros:
    """``torch`` for megatron's schedules module: ``zeros(..., device="cuda")`` lands on the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if str(device).startswith("cuda") else device, **kwargs)


def _define_missing_te_names() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)


def _keep_cpu_tracker(*args, force_reset: bool = False, **kwargs) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    if force_reset or not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
