"""The Hugging Face PEFT LoRA format: the one place that reads, validates and writes it.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<hf module>.lora_A.weight`` (``A: [r, in]``) and ``...lora_B.weight``
(``B: [out, r]``).  Module ``m`` computes ``W x + s_m B A x`` with ``s_m`` from ``lora_alpha``
and ``r`` (or their ``alpha_pattern`` / ``rank_pattern`` entries) as
:func:`slime.utils.lora_config.lora_scaling` defines it.  This is what peft, vLLM and SGLang
read; the trainer's export/import (``slime_plugins.lora.peft_io``), the rollout engines and
``tools/merge_lora.py`` all go through this module.  Pickled ``adapter_model.bin`` is never read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from slime.utils.atomic import write_dir_atomically
from slime.utils.errors import UserError, read_json_file
from slime.utils.lora_config import is_finite_number, lora_scaling

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def peft_key(module: str, which: str) -> str:
    """``model.layers.0.self_attn.q_proj``, ``"A"`` -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``."""
    return f"{PEFT_KEY_PREFIX}{module}.lora_{which}.weight"


def parse_peft_key(key: str) -> tuple[str, str] | None:
    """``(hf module, "A" | "B")`` of a PEFT LoRA key, ``None`` for anything else."""
    match = _KEY.match(key)
    return (match["module"], match["which"]) if match else None


def foreign_base_error(where: str | Path, module: str, a: torch.Tensor, b: torch.Tensor, weight_shape) -> str:
    """The one message for an adapter whose ``B A`` does not fit the base weight of ``module``:
    it was trained on another base model."""
    return (f"{where}: module {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the model's "
            f"{list(weight_shape)} weight; the adapter was trained on another base model, pass that model as "
            "--hf-checkpoint")


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
        return lora_scaling(alpha, r, bool(self.config.get("use_rslora")))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under their PEFT keys, as in the file."""
        return {peft_key(m, w): t for m, (a, b) in self.modules.items() for w, t in (("A", a), ("B", b))}


def _pattern_regex(pattern: str) -> str:
    return rf"(.*\.)?({pattern})$"


def _pattern_value(patterns: dict, module: str, default):
    """peft's rule: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", module)`` wins."""
    for pattern, value in patterns.items():
        if re.match(_pattern_regex(pattern), module):
            return value
    return default


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_alpha(value: object) -> bool:
    return is_finite_number(value)


def validate_adapter_config(config: object, where: str | Path) -> dict:
    """``config`` (``adapter_config.json`` contents) if it is a plain LoRA config; else a one-line UserError."""
    if not isinstance(config, dict):
        raise UserError(f"{where}: expected a JSON object")
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"bias is {config.get('bias')!r}; LoRA bias terms are not supported (save with bias='none')")
    if config.get("use_dora") or config.get("modules_to_save"):
        problems.append("DoRA / modules_to_save are not supported; use a plain LoRA adapter")
    if not _is_rank(config.get("r")) or not _is_alpha(config.get("lora_alpha")):
        problems.append("'r' (int >= 1) and 'lora_alpha' (number) are required")
    for name, valid, what in (("rank_pattern", _is_rank, "an int >= 1"), ("alpha_pattern", _is_alpha, "a number")):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            problems.append(f"{name} must be an object of module pattern -> {what}")
            continue
        for pattern, value in patterns.items():
            try:
                re.compile(_pattern_regex(pattern))
            except re.error as exc:
                problems.append(f"{name} key {pattern!r} is not a regular expression ({exc})")
            if not valid(value):
                problems.append(f"{name}[{pattern!r}] is {value!r}, not {what}")
    if problems:
        raise UserError(f"{where}: " + "; ".join(problems))
    return config


def read_adapter_config(path: str | Path) -> dict:
    """The validated ``adapter_config.json`` of an adapter directory."""
    config_file = Path(path) / CONFIG_NAME
    missing = f"{config_file}: missing; pass a directory written by peft's save_pretrained or save_peft_adapter"
    return validate_adapter_config(read_json_file(config_file, missing=missing), config_file)


def _read_tensors(weights_file: Path) -> dict[str, torch.Tensor]:
    if not weights_file.is_file():
        raise UserError(f"{weights_file}: missing (pickled adapter_model.bin is never read); re-save with safetensors")
    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{weights_file}: corrupt or truncated safetensors file ({exc})") from None


def adapter_modules(tensors: dict[str, torch.Tensor], where: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pair PEFT-keyed tensors per module into ``(A [r_m, in], B [out, r_m])``; one-line UserError otherwise."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = parse_peft_key(key)
        if parsed is None:
            raise UserError(f"{where}: unexpected key {key!r} (expected {PEFT_KEY_PREFIX}<module>.lora_A.weight)")
        pairs.setdefault(parsed[0], {})[parsed[1]] = tensor
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise UserError(f"{where}: module {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{where}: module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                            "do not form [r, in] and [out, r]")
        modules[module] = (a, b)
    if not modules:
        raise UserError(f"{where}: holds no LoRA tensors")
    return modules


def read_peft_adapter(path: str | Path) -> PeftAdapter:
    """Read and validate a PEFT adapter directory (JSON + safetensors only, never pickle).

    Every key must be ``base_model.model.<module>.lora_{A,B}.weight``; every module needs both
    matrices with ``A: [r_m, in]``, ``B: [out, r_m]``, ``r_m`` the config's rank for it.  Raises a one-line UserError naming the
    file and the module otherwise.
    """
    path = Path(path)
    config = read_adapter_config(path)
    weights_file = path / WEIGHTS_NAME
    adapter = PeftAdapter(path, config, adapter_modules(_read_tensors(weights_file), weights_file))
    for module, (a, _) in adapter.modules.items():
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        if a.shape[0] != r:
            raise UserError(f"{weights_file}: module {module} has rank {a.shape[0]} but {CONFIG_NAME} gives it r={r} "
                            "(r / rank_pattern); the config does not belong to these tensors")
    return adapter


def write_peft_dir(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors``, replacing ``out_dir`` atomically."""

    def fill(staging: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_dir_atomically(out_dir, fill)
