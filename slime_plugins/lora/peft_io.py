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

from slime.utils.errors import UserError

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
