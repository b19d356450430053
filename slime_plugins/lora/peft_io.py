"""LoRA adapters of a megatron-core model <-> the Hugging Face PEFT format.

The format itself (files, keys, config, per-module scaling) is :mod:`slime.utils.peft_format`;
this module maps the trainer's fused, TP-sharded adapters onto it and back.

Fused Megatron modules against separate HF modules:

* ``linear_qkv`` holds q, k and v (rows interleaved per query group) and has one ``A``:
  ``B A x`` restricted to q's rows is ``B_q A x``, so the fused adapter is *exactly* three HF
  adapters with ``A`` copied and ``B``'s rows de-interleaved.  ``linear_fc1`` -> gate/up likewise.
* The reverse is exact only when the q/k/v ``A``'s are identical (our own export).  An adapter
  trained elsewhere has three independent ``A_p``; :func:`load_peft_adapter` then **re-wraps that
  fused module at rank ``R = sum_p r_p``** with ``A = [A_q; A_k; A_v]`` (``[R, in]``) and ``B``
  block-diagonal (``B_q`` in columns ``0:r_q`` of q's rows, ...), since
  ``[B_q 0 0; 0 B_k 0; 0 0 B_v] [A_q; A_k; A_v] x = [B_q A_q x; B_k A_k x; B_v A_v x]``.
  The module keeps the scaling ``s`` of ``--lora-r``/``--lora-alpha`` (its alpha is set to
  ``s R``, or ``s sqrt(R)`` with rsLoRA).  Such a module exports with ``rank_pattern`` /
  ``alpha_pattern`` entries, which peft honours (vLLM and SGLang need one rank per adapter:
  merge it with ``tools/merge_lora.py`` for them).
* An adapter's ``r``, ``lora_alpha`` and ``use_rslora`` must equal ``--lora-r``, ``--lora-alpha``
  and ``--lora-use-rslora``: a mismatch is a UserError naming the flag, never a silent override.
  Per-module scalings from ``alpha_pattern``/``rank_pattern`` are exact: each HF module's
  ``s_p B_p`` is folded into ``B`` as ``(s_p / s) B_p``.

Mixture-of-experts layers: each expert ``e`` has its own adapters on its fc1/fc2, written under
the per-expert HF names (``mlp.experts.{e}.gate_proj/up_proj/down_proj``, global expert
indices); under expert parallelism each rank exports its experts and the parts are all-gathered,
and on import each rank takes its own experts' tensors.

Under tensor parallelism every rank calls export/import: shards are gathered or cut exactly like
the base weight (``B`` of a column-parallel module by rows, fc1's per-rank ``[gate_i; up_i]``
included; ``A`` of a row-parallel module by columns) with the helpers of
:mod:`slime.backends.megatron_utils.hf_convert`, which owns the Megatron <-> HF layout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from slime.backends.megatron_utils.arch import ModelArch
from slime.backends.megatron_utils.hf_checkpoint import hf_param_shapes
from slime.backends.megatron_utils.hf_convert import (
    gather_expert_ranks,
    gather_tp,
    global_layer_indices,
    global_module,
    hf_from_megatron,
    hf_names,
    local_experts,
    megatron_from_hf,
    megatron_param_kind,
    split_megatron_name,
    tp_shard,
)
from slime.backends.megatron_utils.parallel import barrier, gather_pipeline_stages, is_rank0, tp_rank_size, unwrap_model
from slime.utils.errors import UserError
from slime.utils.hf_names import HF_LAYER_PREFIX, MEGATRON_TO_HF_LAYER, hf_expert_index, split_expert
from slime.utils.lora_config import LoraConfig, target_matches
from slime.utils.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PeftAdapter,
    foreign_base_error,
    parse_peft_key,
    peft_key,
    read_peft_adapter,
    write_peft_dir,
)
from slime_plugins.lora.lora_layer import LoRALinear, lora_modules

_LAYER_MODULE = re.compile(rf"^{re.escape(HF_LAYER_PREFIX)}\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class _Target:
    """One LoRALinear of a chunk and the HF modules it stands for."""

    parent: nn.Module
    attr: str
    name: str  # dotted name in the chunk, e.g. decoder.layers.0.self_attention.linear_qkv
    module: str  # hf_convert's table key, e.g. self_attention.linear_qkv
    hf_modules: tuple[str, ...]  # e.g. model.layers.0.self_attn.q_proj, ... (global layer index)

    @property
    def lora(self) -> LoRALinear:
        return getattr(self.parent, self.attr)


def _targets(chunks: Iterable[nn.Module]) -> list[_Target]:
    """Every LoRALinear of this rank's chunks, named as in the HF model (global layer indices)."""
    found = []
    for chunk in chunks:
        model = unwrap_model(chunk)
        layers, offset = global_layer_indices(model), (local_experts(model) or [0])[0]
        for name, _ in lora_modules(model):
            layer, module, _ = split_megatron_name(f"{name}.weight")
            module = global_module(module, offset)
            if layer is None or (module not in MEGATRON_TO_HF_LAYER and split_expert(module) is None):
                raise UserError(f"--lora-target-modules: LoRA on '{name}' has no PEFT equivalent; "
                                "target only decoder-layer linears (linear_qkv, linear_proj, linear_fc1, linear_fc2)")
            parent_name, _, attr = name.rpartition(".")
            hf = tuple(n.removesuffix(".weight") for n in hf_names(layers[layer], module, "weight"))
            found.append(_Target(model.get_submodule(parent_name), attr, name, module, hf))
    return found


@torch.no_grad()
def export_peft_adapter(chunks: Sequence[nn.Module], arch: ModelArch) -> dict[str, torch.Tensor]:
    """All adapters as a PEFT state dict (CPU tensors, keys ``base_model.model.<hf module>.lora_{A,B}.weight``).

    Collective: every rank of the TP group (and of the PP group when PP > 1) calls it and gets
    the whole dict.  A fused module's ``A`` is copied to each HF part; its ``B`` (gathered over
    TP like the base weight) is split into the parts' rows.
    """
    out: dict[str, torch.Tensor] = {}
    for target in _targets(chunks):
        lora = target.lora
        a = gather_tp(lora.lora_A.detach(), megatron_param_kind(f"{target.name}.lora_A"))
        b = gather_tp(lora.lora_B.detach(), megatron_param_kind(f"{target.name}.lora_B"))
        for hf, b_part in zip(target.hf_modules, hf_from_megatron(target.module, b, arch)):
            out[peft_key(hf, "A")] = a.cpu().clone()
            out[peft_key(hf, "B")] = b_part.cpu().clone(memory_format=torch.contiguous_format)
    return gather_pipeline_stages(gather_expert_ranks(out))


def _hf_linears(arch: ModelArch, targets: Sequence[str] | None = None) -> set[str]:
    """HF modules of the model's linears (by Megatron name, from ``arch``, no weights built), all
    of them or those the plugin's matcher selects for ``targets``, mapped to their HF parts."""
    covered = set()
    for name in arch.linear_shapes():
        if targets is None or any(target_matches(target, name) for target in targets):
            layer, module, _ = split_megatron_name(f"{name}.weight")
            covered.update(n.removesuffix(".weight") for n in hf_names(layer, module, "weight"))
    return covered


def _target_modules(covered: set[str], arch: ModelArch) -> list[str]:
    """Short names (``q_proj``) when every module of that name is covered, else the exact dotted
    names: peft matches list entries by exact name or ``.``-suffix, so either covers exactly
    ``covered``."""
    leaves = {name.rsplit(".", 1)[-1] for name in covered}
    every = {hf for hf in _hf_linears(arch) if hf.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if every == covered else sorted(covered)


def peft_adapter_config(config: LoraConfig, arch: ModelArch, base_model_name_or_path: str | None = None, *,
                        tensors: dict[str, torch.Tensor] | None = None) -> dict:
    """``adapter_config.json`` for the adapters (from ``tensors`` when given, else from the flags).

    Modules whose rank differs from ``--lora-r`` (imported at rank ``R``, see the module
    docstring) get ``rank_pattern`` and an ``alpha_pattern`` keeping the scaling of the flags.
    """
    if tensors is None:
        ranks = {m: config.r for m in _hf_linears(arch, config.targets)}
    else:
        ranks = {key[0]: t.shape[0] for k, t in tensors.items() if (key := parse_peft_key(k)) and key[1] == "A"}
    odd = {m: r for m, r in sorted(ranks.items()) if r != config.r}
    factor = math.sqrt if config.use_rslora else float
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "target_modules": _target_modules(set(ranks), arch), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
        "rank_pattern": {re.escape(m): r for m, r in odd.items()},
        "alpha_pattern": {re.escape(m): config.scaling * factor(r) for m, r in odd.items()},
    }


def adapter_state_tensors(chunks: Sequence[nn.Module], arch: ModelArch, config: LoraConfig,
                          base_model_name_or_path: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, config)`` exactly as :func:`save_peft_adapter` writes them: what weight sync
    hands to the rollout engine's ``load_lora_adapter(name, tensors=..., config=...)``.  Collective."""
    tensors = export_peft_adapter(chunks, arch)
    return tensors, peft_adapter_config(config, arch, base_model_name_or_path, tensors=tensors)


def save_peft_adapter(chunks: Sequence[nn.Module], arch: ModelArch, config: LoraConfig, out_dir: str | Path,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters as a PEFT directory (atomically replacing ``out_dir``).

    Collective: all ranks gather; global rank 0 writes; everyone returns after the write.
    """
    tensors, adapter_config = adapter_state_tensors(chunks, arch, config, base_model_name_or_path)
    if is_rank0():
        write_peft_dir(out_dir, tensors, adapter_config)
    barrier()
    return Path(out_dir)


# --------------------------------------------------------------------------- import


@dataclass(frozen=True)
class _Plan:
    """What one fused module receives: global ``A [R, in]`` and ``B [out, R]`` at scaling ``lora.scaling``."""

    target: _Target
    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def check_flags(adapter: PeftAdapter, lora: LoraConfig) -> None:
    config, where = adapter.config, adapter.path / CONFIG_NAME
    if config["r"] != lora.r:
        raise UserError(f"{where}: r={config['r']} but --lora-r {lora.r}; pass --lora-r {config['r']}")
    if float(config["lora_alpha"]) != float(lora.alpha):
        raise UserError(f"{where}: lora_alpha={config['lora_alpha']} but --lora-alpha {lora.alpha}; "
                        f"pass --lora-alpha {config['lora_alpha']}")
    if bool(config.get("use_rslora")) != lora.use_rslora:
        raise UserError(f"{where}: use_rslora={bool(config.get('use_rslora'))} but --lora-use-rslora is "
                        f"{'on' if lora.use_rslora else 'off'}; make them agree")


def _plan(target: _Target, adapter: PeftAdapter, arch: ModelArch) -> _Plan:
    """Fuse the HF parts of ``target`` into one exact adapter (see the module docstring).

    Parts missing from the adapter get ``B = 0``; each part's ``B_p`` is scaled by ``s_p / s``.
    """
    lora, where = target.lora, adapter.path / WEIGHTS_NAME
    out_f = lora.base_layer.output_size
    part_rows = [p.shape[0] for p in hf_from_megatron(target.module, torch.empty(out_f, 0), arch)]
    present = [(i, hf) for i, hf in enumerate(target.hf_modules) if hf in adapter.modules]
    if not present:
        raise UserError(f"{where}: no tensors for {', '.join(target.hf_modules)}, which --lora-target-modules wraps "
                        f"({target.name}); target only the modules the adapter has")
    a_parts = [adapter.modules[hf][0] for _, hf in present]
    shared = all(a.shape == a_parts[0].shape and torch.equal(a, a_parts[0]) for a in a_parts)
    a_full = a_parts[0] if shared else torch.cat(a_parts, dim=0)
    rank = a_full.shape[0]
    b_parts = [torch.zeros(rows, rank, dtype=torch.float32) for rows in part_rows]
    column = 0
    for i, hf in present:
        a, b = adapter.modules[hf]
        cols = slice(0, rank) if shared else slice(column, column + a.shape[0])
        b_parts[i][:, cols] = b.float() * (adapter.scaling(hf) / lora.scaling)
        column += a.shape[0]
    return _Plan(target, a_full.float(), megatron_from_hf(target.module, b_parts, arch))


def shape_errors(adapter: PeftAdapter, arch: ModelArch) -> list[str]:
    """Adapter modules whose ``B A`` is not the shape of the model's weight of that name: the
    signature of an adapter trained on another base model (checked before anything else)."""
    shapes = hf_param_shapes(arch)
    errors = []
    for module, (a, b) in adapter.modules.items():
        layer_match = _LAYER_MODULE.match(module)
        expected = shapes.get(f"{layer_match[2]}.weight") if layer_match else shapes.get(f"{module}.weight")
        if expected is not None and (b.shape[0], a.shape[1]) != tuple(expected):
            errors.append(foreign_base_error(adapter.path / WEIGHTS_NAME, module, a, b, expected))
    return errors


def _unknown_module_errors(adapter: PeftAdapter, targets: list[_Target], arch: ModelArch,
                           local_layers: set[int], experts: set[int]) -> list[str]:
    """Adapter modules the model lacks; modules of layers on other pipeline stages, and of experts
    on other expert-parallel ranks, are theirs."""
    wrapped = {hf for t in targets for hf in t.hf_modules}
    known_modules = _hf_linears(arch)
    errors = []
    for module in adapter.modules:
        layer_match = _LAYER_MODULE.match(module)
        known = module in known_modules
        expert = hf_expert_index(layer_match[2]) if layer_match else None
        if known and expert is not None and expert not in experts:
            continue
        if not known:
            errors.append(f"{adapter.path / WEIGHTS_NAME}: module {module} does not exist in the model (LoRA goes on "
                          f"{HF_LAYER_PREFIX}.0..{arch.num_layers - 1} attention/MLP projections)")
        elif module not in wrapped and int(layer_match[1]) in local_layers:
            errors.append(f"{adapter.path / WEIGHTS_NAME}: module {module} is not wrapped by --lora-target-modules; "
                          "add it (e.g. its HF name) to the targets")
    return errors


def _rewrap(target: _Target, rank: int) -> LoRALinear:
    """Give ``target``'s active adapter rank ``rank`` at the same scaling (its other adapters stay)."""
    lora = target.lora
    alpha = lora.scaling * (math.sqrt(rank) if lora.use_rslora else rank)
    lora.add_adapter(lora.active, rank, alpha, replace=True)
    return lora


@torch.no_grad()
def load_peft_adapter(chunks: Sequence[nn.Module], arch: ModelArch, path: str | Path, config: LoraConfig) -> None:
    """Load a PEFT adapter directory into the LoRA layers of this rank's chunks (TP-sharded like the base).

    Call it after the base weights and **before the optimizer is built**: a fused module whose
    HF parts have different ``A``'s is re-wrapped at rank ``R = sum r_p`` (exact; see the module
    docstring).  ``r``, ``lora_alpha`` and ``use_rslora`` must equal ``config``'s.  Everything is
    validated first (one-line UserError naming the file and module; an adapter of another base
    model is reported as that, before any module it lacks); then all is copied.
    """
    adapter = read_peft_adapter(path)
    targets = _targets(chunks)
    local_layers = {layer for chunk in chunks for layer in global_layer_indices(unwrap_model(chunk)).values()}
    experts = {e for chunk in chunks for e in local_experts(unwrap_model(chunk))}
    errors = shape_errors(adapter, arch)
    if not errors:
        check_flags(adapter, config)
        errors = _unknown_module_errors(adapter, targets, arch, local_layers, experts)
    if errors:
        raise UserError(errors[0] if len(errors) == 1 else f"{errors[0]} (and {len(errors) - 1} more)")
    plans = [_plan(t, adapter, arch) for t in targets]
    tp_rank, tp_size = tp_rank_size()
    for plan in plans:
        target = plan.target
        lora = target.lora if plan.rank == target.lora.r else _rewrap(target, plan.rank)
        for which, full in (("lora_A", plan.a), ("lora_B", plan.b)):
            param = getattr(lora, which)
            param.copy_(tp_shard(megatron_param_kind(f"{target.name}.{which}"), full, tp_rank, tp_size))
