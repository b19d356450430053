"""Low-rank adapters (LoRA) for plain and Megatron tensor-parallel linear layers.

A :class:`LoRALinear` wraps a frozen linear layer ``W`` (never copying it) and adds

    y = W x + s * B (A dropout(x)),      s = alpha / r   (alpha / sqrt(r) with rsLoRA)

with ``A: [r, in]`` Kaiming-uniform (a = sqrt(5)) and ``B: [out, r]`` zero, so the wrapped
layer computes exactly what the base computed until ``B`` learns something.

Shapes always come from the *local* weight shard ``W_local: [out_local, in_local]``:
``A: [r, in_local]`` and ``B: [out_local, r]``.  Under tensor parallelism (TP) this gives

* column-parallel base (``linear_qkv``, ``linear_fc1``; ``W`` split by output rows): ``A`` is
  replicated, ``B`` split by rows like ``W``.  ``h = A x`` is identical on every rank; its
  gradient is all-reduced over the TP group (sequence parallel: ``h`` is all-gathered along
  the sequence and its gradient reduce-scattered), so every rank's ``A`` gets the full gradient.
* row-parallel base (``linear_proj``, ``linear_fc2``; ``W`` split by input columns): ``A`` split
  by columns like ``W``; the partial products ``A_local x_local`` are all-reduced
  (reduce-scattered along the sequence under sequence parallel) before the replicated ``B``.

Either way ``B_local @ A_local`` has the shape of ``W_local``, which makes :meth:`merge` local.
A is initialised from the *global* shape with a generator seeded per module, then sliced, so
a TP=2 run starts from exactly the adapter of a TP=1 run.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from slime.backends.megatron_utils.parallel import group_rank_size
from slime.utils.lora_config import hparam_errors, lora_scaling, rank_errors, resolve_targets, target_matches
from slime_plugins.lora.input_recompute import down_project
from slime_plugins.lora.up_projection import AddScaledUpProjection

DEFAULT_ADAPTER = "default"


def _parallel_kind(layer: nn.Module) -> str:
    """'plain' for nn.Linear, 'column' / 'row' for Megatron's parallel linears."""
    if isinstance(layer, nn.Linear):
        return "plain"
    try:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    except ImportError:  # megatron is optional for plain torch models
        return "unsupported"
    if isinstance(layer, ColumnParallelLinear):
        return "column"
    if isinstance(layer, RowParallelLinear):
        return "row"
    return "unsupported"


def _output_is_never_saved(layer: nn.Module) -> bool:
    """True for exactly ``nn.Linear`` and megatron's two parallel linears, whose autograd saves
    their input only, so their output may be written in place (a subclass might save it)."""
    if type(layer) is nn.Linear:
        return True
    try:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    except ImportError:
        return False
    return type(layer) in (ColumnParallelLinear, RowParallelLinear)


def _global_shape(layer: nn.Module, kind: str) -> tuple[int, int]:
    """(out_features, in_features) of the whole, unsharded layer."""
    if kind == "plain":
        return layer.out_features, layer.in_features
    return layer.output_size, layer.input_size


def _module_seed(seed: int, name: str) -> int:
    """A stable per-module seed, independent of TP size and of process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class LoRAWeights(nn.Module):
    """One adapter of a :class:`LoRALinear`: ``lora_A [r, in_local]``, ``lora_B [out_local, r]`` and
    its scaling ``s``."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, lora_alpha: float, scaling: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(lora_A)
        self.lora_B = nn.Parameter(lora_B)
        self.r = lora_A.shape[0]
        self.lora_alpha = lora_alpha
        self.scaling = scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:g}"


class LoRALinear(nn.Module):
    """A linear layer plus trainable low-rank updates; see the module docstring for the math.

    Like peft, one base layer holds a name-keyed set of adapters (``adapters``, one
    :class:`LoRAWeights` each; ``default`` in a one-task run); the ``active`` one is applied.
    ``lora_A``, ``lora_B``, ``r`` and ``scaling`` are the active adapter's.
    ``forward`` returns what the base returns: a tensor for ``nn.Linear``, the
    ``(output, bias)`` tuple for Megatron's parallel linears (bias passed through).
    State: ``merged`` (the active delta folded into ``W``), ``disabled`` (every delta skipped) and
    ``active`` are changed only by :meth:`merge`, :meth:`unmerge`, :func:`disable_adapters` and
    :func:`use_adapter`.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        init_seed: int = 0,
        name: str = "",
        adapter: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        self.kind = _parallel_kind(base_layer)
        self._output_writable = _output_is_never_saved(base_layer)
        if self.kind == "unsupported":
            raise ValueError(f"LoRA target {name or base_layer!r}: unsupported layer type {type(base_layer).__name__}")
        if self.kind == "column" and getattr(base_layer, "gather_output", False):
            raise ValueError(f"LoRA target {name}: column-parallel layers with gather_output=True are not supported")
        if self.kind == "row" and not getattr(base_layer, "input_is_parallel", True):
            raise ValueError(f"LoRA target {name}: row-parallel layers need input_is_parallel=True")
        self.base_layer = base_layer
        self.name = name
        self.use_rslora = use_rslora
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # megatron leaves the flag on an MoE expert's linears, whose TP group (expert TP) is 1 rank
        self.sequence_parallel = bool(getattr(base_layer, "sequence_parallel", False)) and group_rank_size(
            getattr(base_layer, "tp_group", None))[1] > 1
        self.adapters = nn.ModuleDict()
        self.active = adapter
        self.merged = False
        self.disabled = False
        self.add_adapter(adapter, r, lora_alpha, init_seed)
        self.register_state_dict_post_hook(_save_base_under_own_names)
        self.register_load_state_dict_pre_hook(_load_base_from_own_names)
        self.register_load_state_dict_post_hook(_lora_keys_are_optional)

    def add_adapter(self, adapter: str, r: int, lora_alpha: float, init_seed: int = 0, *, replace: bool = False) -> None:
        """Add a fresh adapter ``adapter`` (A Kaiming-uniform from ``init_seed``, B zero) next to the others.

        The same ``init_seed`` gives the same ``A`` whatever the adapter's name, so a task's
        adapter starts where a one-task run with that seed starts.  ``replace`` swaps an existing
        adapter of that name (a PEFT file of another rank is loaded that way).
        """
        if adapter in self.adapters and not replace:
            raise ValueError(f"LoRA target {self.name}: adapter '{adapter}' exists already")
        if self.merged:
            raise RuntimeError(f"LoRA target {self.name}: unmerge before changing adapters")
        weight = self.base_layer.weight
        out_local, in_local = weight.shape
        factory = dict(dtype=weight.dtype, device=weight.device)
        scaling = lora_scaling(lora_alpha, r, self.use_rslora)
        self.adapters[adapter] = LoRAWeights(self._init_A(r, in_local, init_seed, self.name).to(**factory),
                                             torch.zeros(out_local, r, **factory), lora_alpha, scaling)
        self._mark_tensor_parallel(self.adapters[adapter])

    def set_active(self, adapter: str) -> None:
        """Route the forward (and merge, export, load) through ``adapter``; see :func:`use_adapter`."""
        if adapter not in self.adapters:
            raise KeyError(f"LoRA target {self.name}: no adapter '{adapter}' (have {', '.join(self.adapters)})")
        if self.merged and adapter != self.active:
            raise RuntimeError(f"LoRA target {self.name}: unmerge '{self.active}' before switching to '{adapter}'")
        self.active = adapter

    @property
    def current(self) -> LoRAWeights:
        return self.adapters[self.active]

    @property
    def lora_A(self) -> nn.Parameter:
        return self.current.lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.current.lora_B

    @property
    def r(self) -> int:
        return self.current.r

    @property
    def lora_alpha(self) -> float:
        return self.current.lora_alpha

    @property
    def scaling(self) -> float:
        return self.current.scaling

    def _init_A(self, r: int, in_local: int, seed: int, name: str) -> torch.Tensor:
        """Kaiming-uniform(a=sqrt(5)) over the global ``[r, in]``, then this rank's columns."""
        _, in_global = _global_shape(self.base_layer, self.kind)
        full = torch.empty(r, in_global)
        gen = torch.Generator().manual_seed(_module_seed(seed, name))
        bound = 1.0 / math.sqrt(in_global)  # kaiming_uniform_ with a=sqrt(5) reduces to this
        full.uniform_(-bound, bound, generator=gen)
        if self.kind != "row":
            return full
        rank, _ = group_rank_size(getattr(self.base_layer, "tp_group", None))
        return full[:, rank * in_local : (rank + 1) * in_local].clone()

    def _mark_tensor_parallel(self, weights: LoRAWeights) -> None:
        """Tag parameters the way megatron tags its own, so grad-norm and sync treat them right.

        ``tensor_model_parallel``: this rank holds a shard (counted on every rank in the grad norm).
        ``sequence_parallel``: a replicated tensor fed by a sequence slice, whose gradient is a
        partial sum over the TP group.
        """
        if self.kind == "plain":
            return
        split, replicated = (weights.lora_B, weights.lora_A) if self.kind == "column" else (weights.lora_A, weights.lora_B)
        tp_size = group_rank_size(getattr(self.base_layer, "tp_group", None))[1]
        split.tensor_model_parallel = tp_size > 1
        split.partition_dim = 0 if self.kind == "column" else 1
        split.partition_stride = 1
        replicated.tensor_model_parallel = False
        replicated.sequence_parallel = self.sequence_parallel
        if not getattr(self.base_layer.weight, "allreduce", True):  # an MoE expert's (optimizer.py)
            weights.lora_A.allreduce = weights.lora_B.allreduce = False

    def lora_parameters(self) -> list[nn.Parameter]:
        """The active adapter's trainable parameters: ``[lora_A, lora_B]``."""
        return [self.lora_A, self.lora_B]

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={a.r}, alpha={a.lora_alpha}, scaling={a.scaling:g}" for n, a in self.adapters.items())
        return f"kind={self.kind}, active={self.active}, adapters=[{adapters}]"

    def lora_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``A dropout(x)`` [..., r], after the TP communication of the base layer's kind."""
        fork = contextlib.nullcontext()
        if self.kind == "row" and self.training and isinstance(self.lora_dropout, nn.Dropout):
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            # x is this rank's slice of the input: dropout masks must differ per rank.
            fork = get_cuda_rng_tracker().fork()
        with fork:
            if isinstance(self.lora_dropout, nn.Identity):  # x itself, maybe recomputed in backward
                h = down_project(x, self.lora_A)
            else:
                h = F.linear(self.lora_dropout(x), self.lora_A)
        return self._communicate(h)

    def add_delta(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``result + s * B A dropout(x)``, accumulated into ``result`` when that is safe.

        On the CPU a separate scale or sum pass over the ``[tokens, out]`` output costs as much as
        the two thin LoRA matmuls, so the scale and the sum ride on the B product (``addmm_``).
        ``result`` is written in place only when it is the fresh output of ``nn.Linear`` or a
        megatron parallel linear, which save only their input (autograd's version counter would
        raise otherwise).  Autograd forbids writing into a view a custom Function returned
        (megatron's TP=1 reductions return their input), so views and other base classes get a
        new tensor from the same ``addmm``; dtype/layout mismatches take the plain path.
        """
        h = self.lora_hidden(x)
        if result.dtype != self.lora_B.dtype or not result.is_contiguous():
            return result + (F.linear(h, self.lora_B) * self.scaling).to(result.dtype)
        inplace = self._output_writable and not result._is_view()
        return AddScaledUpProjection.apply(result, h, self.lora_B, self.scaling, inplace)

    def _communicate(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "plain":
            return h
        from megatron.core.tensor_parallel import mappings

        group = self.base_layer.tp_group
        if self.kind == "column":
            if self.sequence_parallel:
                return mappings.gather_from_sequence_parallel_region(h, group=group)
            return mappings.copy_to_tensor_model_parallel_region(h, group=group)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(h, group=group)
        return mappings.reduce_from_tensor_model_parallel_region(h, group=group)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return out
        if isinstance(out, tuple):
            result, bias = out
            return self.add_delta(result, x), bias
        return self.add_delta(out, x)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s * B @ A`` into this rank's base weight shard; forward then skips the delta."""
        if not self.merged:
            self.base_layer.weight.add_((self.lora_B @ self.lora_A).to(self.base_layer.weight.dtype), alpha=self.scaling)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (up to floating-point rounding)."""
        if self.merged:
            self.base_layer.weight.sub_((self.lora_B @ self.lora_A).to(self.base_layer.weight.dtype), alpha=self.scaling)
            self.merged = False


def _save_base_under_own_names(module, state_dict, prefix, local_metadata) -> None:
    """``x.base_layer.weight`` is saved as ``x.weight``: base checkpoints keep their names."""
    inner = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _load_base_from_own_names(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """``x.weight`` (a base checkpoint's name) loads into ``x.base_layer.weight``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if "." not in rest:
            state_dict[prefix + "base_layer." + rest] = state_dict.pop(key)


def _lora_keys_are_optional(module, incompatible_keys) -> None:
    """A base checkpoint has no LoRA tensors: loading it keeps the fresh adapter."""
    missing = incompatible_keys.missing_keys
    for key in [k for k in missing if k.endswith((".lora_A", ".lora_B"))]:
        missing.remove(key)


def find_lora_targets(model: nn.Module, target_modules: Iterable[str]) -> tuple[dict[str, nn.Module], list[str]]:
    """Modules to wrap (by dotted name) and one error per target that matched nothing.

    A target matches a module's own attribute name exactly (``linear_fc1`` matches
    ``decoder.layers.0.mlp.linear_fc1`` and never ``linear_fc10``) or, when it contains glob
    characters, the full dotted name (``*.layers.0.*.linear_qkv``).  A LoRALinear and
    everything inside it are never matched again.
    """
    targets = resolve_targets(target_modules)
    inside_lora = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    found: dict[str, nn.Module] = {}
    hits = {t: 0 for t in targets}
    for name, module in model.named_modules():
        if not name or isinstance(module, LoRALinear) or any(name.startswith(p + ".") for p in inside_lora):
            continue
        for target in targets:
            if target_matches(target, name):
                found[name] = module
                hits[target] += 1
    errors = [f"--lora-target-modules: '{t}' matches no module of the model" for t, n in hits.items() if n == 0]
    return found, errors


def apply_lora_to_model(
    model: nn.Module,
    target_modules: Iterable[str],
    r: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    *,
    use_rslora: bool = False,
    init_seed: int = 0,
    adapter: str = DEFAULT_ADAPTER,
    whole_name: Callable[[str], str] | None = None,
) -> list[str]:
    """Wrap every targeted linear of ``model`` in a :class:`LoRALinear` holding adapter ``adapter``, in place.

    ``whole_name`` maps a module's name in ``model`` to its name in the whole model (a pipeline
    stage or expert-parallel rank numbers its layers and experts from 0); ``A``'s seed comes from
    that name, so every layout starts from the same adapter.  Returns the dotted names of the
    wrapped modules.  All problems (bad hyper-parameters, a
    target matching nothing, an unsupported layer type, ``r`` above a layer's smaller
    dimension) are collected and raised together as one ``ValueError`` naming flag and target.
    """
    target_modules = list(target_modules)
    errors = hparam_errors(r, lora_alpha, lora_dropout)
    found, match_errors = find_lora_targets(model, target_modules)
    errors += match_errors
    shapes = {}
    for name, module in found.items():
        kind = _parallel_kind(module)
        if kind == "unsupported":
            errors.append(f"--lora-target-modules: '{name}' is a {type(module).__name__}, not a linear layer")
        else:
            shapes[name] = _global_shape(module, kind)
    if not hparam_errors(r, 1.0, 0.0):  # a valid rank: compare it with every module at once
        errors += rank_errors(r, shapes)
    if errors:
        raise ValueError("; ".join(errors))
    for name, module in found.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRALinear(module, r, lora_alpha, lora_dropout, use_rslora=use_rslora, init_seed=init_seed,
                             name=whole_name(name) if whole_name else name, adapter=adapter)
        setattr(parent, attr, wrapped)
    return list(found)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The active adapter's parameters, every layer."""
    return [p for _, m in lora_modules(model) for p in m.lora_parameters()]


def _layers(model: nn.Module | Iterable[nn.Module]) -> list[LoRALinear]:
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    return [m for c in chunks for _, m in lora_modules(c)]


def adapter_names(model: nn.Module | Iterable[nn.Module]) -> list[str]:
    """The adapters of the model's LoRA layers, in the order they were added."""
    layers = _layers(model)
    return list(layers[0].adapters) if layers else []


def add_adapter(model: nn.Module | Iterable[nn.Module], adapter: str, r: int, lora_alpha: float,
                init_seed: int = 0) -> None:
    """A fresh adapter ``adapter`` on every LoRA layer (all problems raised together as one ValueError)."""
    layers = _layers(model)
    errors = hparam_errors(r, lora_alpha, 0.0)
    if not errors:
        errors += rank_errors(r, {m.name: _global_shape(m.base_layer, m.kind) for m in layers})
    if errors:
        raise ValueError("; ".join(f"adapter '{adapter}': {e}" for e in errors))
    for m in layers:
        m.add_adapter(adapter, r, lora_alpha, init_seed)


def all_adapter_parameters(model: nn.Module | Iterable[nn.Module]) -> list[nn.Parameter]:
    """``[A, B]`` of every adapter, every layer."""
    return [p for m in _layers(model) for a in m.adapters.values() for p in (a.lora_A, a.lora_B)]


def adapter_parameters(model: nn.Module | Iterable[nn.Module], adapter: str) -> list[nn.Parameter]:
    """``[A, B]`` of adapter ``adapter``, every layer: what that adapter's optimizer steps."""
    return [p for m in _layers(model) for p in (m.adapters[adapter].lora_A, m.adapters[adapter].lora_B)]


@contextlib.contextmanager
def use_adapter(model: nn.Module | Iterable[nn.Module], adapter: str):
    """Inside the block every LoRA layer applies (and exports, loads, merges) adapter ``adapter``.

    One forward goes through one adapter: a micro-batch belongs to one task.
    """
    layers = _layers(model)
    previous = [m.active for m in layers]
    for m in layers:
        m.set_active(adapter)
    try:
        yield
    finally:
        for m, was in zip(layers, previous):
            m.set_active(was)


@contextlib.contextmanager
def disable_adapters(model: nn.Module | Iterable[nn.Module]):
    """Run the base model: every LoRALinear skips its delta inside the block.

    This is how the reference policy is computed for KL: same weights, adapters off.
    """
    layers = _layers(model)
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, was in zip(layers, previous):
            m.disabled = was


def merge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        m.unmerge()
