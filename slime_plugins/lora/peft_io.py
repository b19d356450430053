"""LoRA adapters in the Hugging Face PEFT format: export from and import into megatron-core.

The format (what peft, vLLM and SGLang read) is a directory holding ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<hf module>.lora_A.weight`` (``[r, in]``)
and ``...lora_B.weight`` (``[out, r]``); the module computes ``W x + s B A x`` with
``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

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

Under tensor parallelism every rank calls export/import: shards are gathered or cut exactly like
the base weight (``B`` of a column-parallel module by rows, fc1's per-rank ``[gate_i; up_i]``
included; ``A`` of a row-parallel module by columns) with the helpers of
:mod:`slime.backends.megatron_utils.hf_convert`, which owns the Megatron <-> HF layout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from slime.backends.megatron_utils.arch import ModelArch
from slime.backends.megatron_utils.hf_convert import (
    HF_LAYER_PREFIX,
    MEGATRON_TO_HF_LAYER,
    _gather_pipeline_stages,
    gather_tp,
    global_layer_indices,
    hf_from_megatron,
    hf_names,
    megatron_from_hf,
    megatron_param_kind,
    split_megatron_name,
    tp_shard,
)
from slime.utils.errors import UserError
from slime_plugins.lora.lora_layer import LoRALinear, find_lora_targets, lora_modules
from slime_plugins.lora.megatron_lora_hook import unwrap_model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


# --------------------------------------------------------------------------- the HF side


@dataclass(frozen=True)
class PeftAdapter:
    """A validated PEFT LoRA adapter: its config and, per HF module name, ``(A [r, in], B [out, r])``."""

    path: Path
    config: dict
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def scaling(self, module: str) -> float:
        """``s`` of one HF module, honouring ``rank_pattern`` / ``alpha_pattern`` as peft does."""
        r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def _pattern_value(patterns: dict, module: str, default):
    """peft's rule: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)`` wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _read_config(path: Path) -> dict:
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise UserError(f"{config_file}: missing; pass a directory written by peft's save_pretrained or save_peft_adapter")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: expected a JSON object")
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"bias is {config.get('bias')!r}; LoRA bias terms are not supported (save with bias='none')")
    if config.get("use_dora") or config.get("modules_to_save"):
        problems.append("DoRA / modules_to_save are not supported; use a plain LoRA adapter")
    if not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), (int, float)):
        problems.append("'r' (int) and 'lora_alpha' (number) are required")
    if problems:
        raise UserError(f"{config_file}: " + "; ".join(problems))
    return config


def _read_tensors(weights_file: Path) -> dict[str, torch.Tensor]:
    if not weights_file.is_file():
        raise UserError(f"{weights_file}: missing (pickled adapter_model.bin is never read); re-save with safetensors")
    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{weights_file}: corrupt or truncated safetensors file ({exc})") from None


def read_peft_adapter(path: str | Path) -> PeftAdapter:
    """Read and validate a PEFT adapter directory (JSON + safetensors only, never pickle).

    Every key must be ``base_model.model.<module>.lora_{A,B}.weight``; every module needs both
    matrices with ``A: [r_m, in]``, ``B: [out, r_m]``.  Raises a one-line UserError naming the
    file and the module otherwise.
    """
    path = Path(path)
    config = _read_config(path)
    weights_file = path / WEIGHTS_NAME
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _read_tensors(weights_file).items():
        match = _KEY.match(key)
        if match is None:
            raise UserError(f"{weights_file}: unexpected key {key!r} (expected {PEFT_KEY_PREFIX}<module>.lora_A.weight)")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise UserError(f"{weights_file}: module {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{weights_file}: module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                            "do not form [r, in] and [out, r]")
        modules[module] = (a, b)
    if not modules:
        raise UserError(f"{weights_file}: holds no LoRA tensors")
    return PeftAdapter(path, config, modules)


def write_dir_atomically(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(staging)`` on a fresh sibling directory, then swap it in for ``out_dir``.

    ``out_dir.tmp-<pid>`` is filled and renamed into place; an existing ``out_dir`` is first
    renamed to ``out_dir.old-<pid>`` and removed afterwards, so readers see the old or the new
    directory, never a mix.  A failure removes the staging directory and leaves ``out_dir`` alone.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    retired = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        if out_dir.exists():
            os.replace(out_dir, retired)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)
    return out_dir


def write_peft_dir(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically (see :func:`write_dir_atomically`)."""

    def write(staging: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_dir_atomically(out_dir, write)


# --------------------------------------------------------------------------- the Megatron side


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
        layers = global_layer_indices(model)
        for name, _ in lora_modules(model):
            layer, module, _ = split_megatron_name(f"{name}.weight")
            if layer is None or module not in MEGATRON_TO_HF_LAYER:
                raise UserError(f"--lora-target-modules: LoRA on '{name}' has no PEFT equivalent; "
                                "target only decoder-layer linears (linear_qkv, linear_proj, linear_fc1, linear_fc2)")
            parent_name, _, attr = name.rpartition(".")
            hf = tuple(n.removesuffix(".weight") for n in hf_names(layers[layer], module, "weight"))
            found.append(_Target(model.get_submodule(parent_name), attr, name, module, hf))
    return found


def _tp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return 0, 1
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


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
            out[f"{PEFT_KEY_PREFIX}{hf}.lora_A.weight"] = a.cpu().clone()
            out[f"{PEFT_KEY_PREFIX}{hf}.lora_B.weight"] = b_part.cpu().clone(memory_format=torch.contiguous_format)
    return _gather_pipeline_stages(out)


def _scaling(args: argparse.Namespace, r: int | None = None) -> float:
    r = args.lora_r if r is None else r
    return args.lora_alpha / math.sqrt(r) if getattr(args, "lora_use_rslora", False) else args.lora_alpha / r


def _covered_by_flags(args: argparse.Namespace, arch: ModelArch) -> set[str]:
    """HF modules that ``--lora-target-modules`` wraps, found by matching them against a skeleton
    with the model's Megatron names (the same matcher as the real model, no weights built)."""
    skeleton = nn.Module()
    for layer in range(arch.num_layers):
        for module in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            parent_name, _, leaf = f"decoder.layers.{layer}.{module}".rpartition(".")
            _ensure_path(skeleton, parent_name).add_module(leaf, nn.Linear(1, 1, bias=False))
    found, _ = find_lora_targets(skeleton, args.lora_target_modules)
    covered = set()
    for name in found:
        layer, module, _ = split_megatron_name(f"{name}.weight")
        covered.update(n.removesuffix(".weight") for n in hf_names(layer, module, "weight"))
    return covered


def _ensure_path(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    return root


def _target_modules(covered: set[str], arch: ModelArch) -> list[str]:
    """Short names (``q_proj``) when every layer's module of that name is covered, else the
    exact dotted names: peft matches list entries by exact name or ``.``-suffix, so either
    covers exactly ``covered``."""
    leaves = {name.rsplit(".", 1)[-1] for name in covered}
    every_layer = {hf for layer in range(arch.num_layers) for module in MEGATRON_TO_HF_LAYER
                   for hf in (n.removesuffix(".weight") for n in hf_names(layer, module, "weight"))
                   if hf.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if every_layer == covered else sorted(covered)


def peft_adapter_config(args: argparse.Namespace, arch: ModelArch, base_model_name_or_path: str | None = None, *,
                        tensors: dict[str, torch.Tensor] | None = None) -> dict:
    """``adapter_config.json`` for the adapters (from ``tensors`` when given, else from the flags).

    Modules whose rank differs from ``--lora-r`` (imported at rank ``R``, see the module
    docstring) get ``rank_pattern`` and an ``alpha_pattern`` keeping the scaling of the flags.
    """
    if tensors is None:
        ranks = {m: args.lora_r for m in _covered_by_flags(args, arch)}
    else:
        ranks = {m["module"]: t.shape[0] for k, t in tensors.items() if (m := _KEY.match(k)) and m["which"] == "A"}
    scaling = _scaling(args)
    odd = {m: r for m, r in sorted(ranks.items()) if r != args.lora_r}
    factor = math.sqrt if getattr(args, "lora_use_rslora", False) else float
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": args.lora_r, "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout, "use_rslora": bool(getattr(args, "lora_use_rslora", False)),
        "target_modules": _target_modules(set(ranks), arch), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path or getattr(args, "hf_checkpoint", None),
        "rank_pattern": {re.escape(m): r for m, r in odd.items()},
        "alpha_pattern": {re.escape(m): scaling * factor(r) for m, r in odd.items()},
    }


def adapter_state_tensors(chunks: Sequence[nn.Module], arch: ModelArch, args: argparse.Namespace,
                          base_model_name_or_path: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, config)`` exactly as :func:`save_peft_adapter` writes them: what weight sync
    hands to the rollout engine's ``load_lora_adapter(name, tensors=..., config=...)``.  Collective."""
    tensors = export_peft_adapter(chunks, arch)
    return tensors, peft_adapter_config(args, arch, base_model_name_or_path, tensors=tensors)


def save_peft_adapter(chunks: Sequence[nn.Module], arch: ModelArch, args: argparse.Namespace, out_dir: str | Path,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters as a PEFT directory (atomically replacing ``out_dir``).

    Collective: all ranks gather; global rank 0 writes; everyone returns after the write.
    """
    tensors, config = adapter_state_tensors(chunks, arch, args, base_model_name_or_path)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_peft_dir(out_dir, tensors, config)
    if dist.is_initialized():
        dist.barrier()
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


def _check_flags(adapter: PeftAdapter, args: argparse.Namespace) -> None:
    config, where = adapter.config, adapter.path / CONFIG_NAME
    rslora = bool(getattr(args, "lora_use_rslora", False))
    if config["r"] != args.lora_r:
        raise UserError(f"{where}: r={config['r']} but --lora-r {args.lora_r}; pass --lora-r {config['r']}")
    if float(config["lora_alpha"]) != float(args.lora_alpha):
        raise UserError(f"{where}: lora_alpha={config['lora_alpha']} but --lora-alpha {args.lora_alpha}; "
                        f"pass --lora-alpha {config['lora_alpha']}")
    if bool(config.get("use_rslora")) != rslora:
        raise UserError(f"{where}: use_rslora={bool(config.get('use_rslora'))} but --lora-use-rslora is "
                        f"{'on' if rslora else 'off'}; make them agree")


def _plan(target: _Target, adapter: PeftAdapter, arch: ModelArch) -> _Plan:
    """Fuse the HF parts of ``target`` into one exact adapter (see the module docstring).

    Parts missing from the adapter get ``B = 0``; each part's ``B_p`` is scaled by ``s_p / s``.
    """
    lora, where = target.lora, adapter.path / WEIGHTS_NAME
    out_f, in_f = lora.base_layer.output_size, lora.base_layer.input_size
    part_rows = [p.shape[0] for p in hf_from_megatron(target.module, torch.empty(out_f, 0), arch)]
    present = [(i, hf) for i, hf in enumerate(target.hf_modules) if hf in adapter.modules]
    if not present:
        raise UserError(f"{where}: no tensors for {', '.join(target.hf_modules)}, which --lora-target-modules wraps "
                        f"({target.name}); target only the modules the adapter has")
    for i, hf in present:
        a, b = adapter.modules[hf]
        if a.shape[1] != in_f or b.shape[0] != part_rows[i]:
            raise UserError(f"{where}: module {hf}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the "
                            f"model's [{part_rows[i]}, {in_f}] weight; the adapter was trained on another model")
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


def _unknown_module_errors(adapter: PeftAdapter, targets: list[_Target], arch: ModelArch,
                           local_layers: set[int]) -> list[str]:
    """Adapter modules the model lacks; modules of layers on other pipeline stages are theirs."""
    wrapped = {hf for t in targets for hf in t.hf_modules}
    errors = []
    for module in adapter.modules:
        layer_match = re.match(rf"^{re.escape(HF_LAYER_PREFIX)}\.(\d+)\.(.+)$", module)
        known = layer_match is not None and int(layer_match[1]) < arch.num_layers and any(
            layer_match[2] in parts for parts in MEGATRON_TO_HF_LAYER.values())
        if not known:
            errors.append(f"{adapter.path / WEIGHTS_NAME}: module {module} does not exist in the model (LoRA goes on "
                          f"{HF_LAYER_PREFIX}.0..{arch.num_layers - 1} attention/MLP projections)")
        elif module not in wrapped and int(layer_match[1]) in local_layers:
            errors.append(f"{adapter.path / WEIGHTS_NAME}: module {module} is not wrapped by --lora-target-modules; "
                          "add it (e.g. its HF name) to the targets")
    return errors


def _rewrap(target: _Target, rank: int) -> LoRALinear:
    """Replace ``target``'s LoRALinear by one of ``rank`` on the same base layer and the same scaling."""
    old = target.lora
    alpha = old.scaling * (math.sqrt(rank) if old.use_rslora else rank)
    dropout = old.lora_dropout.p if isinstance(old.lora_dropout, nn.Dropout) else 0.0
    new = LoRALinear(old.base_layer, rank, alpha, dropout, use_rslora=old.use_rslora, name=target.name)
    new.train(old.training)
    setattr(target.parent, target.attr, new)
    return new


@torch.no_grad()
def load_peft_adapter(chunks: Sequence[nn.Module], arch: ModelArch, path: str | Path, args: argparse.Namespace) -> None:
    """Load a PEFT adapter directory into the LoRA layers of this rank's chunks (TP-sharded like the base).

    Call it after the base weights and **before the optimizer is built**: a fused module whose
    HF parts have different ``A``'s is re-wrapped at rank ``R = sum r_p`` (exact; see the module
    docstring).  ``r``, ``lora_alpha`` and ``use_rslora`` must equal the flags.  Everything is
    validated first (one-line UserError naming the file and module); then all is copied.
    """
    adapter = read_peft_adapter(path)
    _check_flags(adapter, args)
    targets = _targets(chunks)
    local_layers = {layer for chunk in chunks for layer in global_layer_indices(unwrap_model(chunk)).values()}
    errors = _unknown_module_errors(adapter, targets, arch, local_layers)
    if errors:
        raise UserError(errors[0] if len(errors) == 1 else f"{errors[0]} (and {len(errors) - 1} more)")
    plans = [_plan(t, adapter, arch) for t in targets]
    tp_rank, tp_size = _tp_rank_size()
    for plan in plans:
        target = plan.target
        lora = target.lora if plan.rank == target.lora.r else _rewrap(target, plan.rank)
        for which, full in (("lora_A", plan.a), ("lora_B", plan.b)):
            param = getattr(lora, which)
            param.copy_(tp_shard(megatron_param_kind(f"{target.name}.{which}"), full, tp_rank, tp_size))
