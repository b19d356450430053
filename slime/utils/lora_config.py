"""The LoRA configuration: one typed object, built once from the flags, validated there.

    y = W x + s * B (A dropout(x)),   A: [r, in],  B: [out, r],
    s = alpha / r            (alpha / sqrt(r) with rsLoRA: --lora-use-rslora)

:func:`lora_scaling` is the only place that formula lives.  Targets are the per-layer linear
modules of :data:`slime.utils.hf_names.LINEAR_MODULES` by their Megatron attribute name
(``linear_qkv`` ...), their Hugging Face projection names (``q_proj`` -> ``linear_qkv``),
``all-linear``, or globs over dotted module names (``*.layers.0.*.linear_qkv``).

``--lora-r`` -> ``LoraConfig.r`` -> every ``LoRALinear.r`` and ``adapter_config.json["r"]``.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from slime.utils.hf_names import LINEAR_MODULES, MEGATRON_TO_HF_LAYER, leaf

ALL_LINEAR_FLAG = "all-linear"
GLOB_CHARS = frozenset("*?[")
# Megatron linear (attribute name) -> the HF projections it fuses, from the one name table.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    leaf(module): tuple(leaf(hf) for hf in MEGATRON_TO_HF_LAYER[module]) for module in LINEAR_MODULES
}
ALL_LINEAR: tuple[str, ...] = tuple(LORA_TARGETS)
HF_ALIASES: dict[str, str] = {hf: megatron for megatron, parts in LORA_TARGETS.items() for hf in parts}


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def resolve_targets(target_modules: Iterable[str]) -> list[str]:
    """Expand ``all-linear`` and HF aliases into Megatron names, keeping order, no repeats; globs pass."""
    resolved: list[str] = []
    for target in target_modules:
        names = ALL_LINEAR if target == ALL_LINEAR_FLAG else (HF_ALIASES.get(target, target),)
        resolved.extend(n for n in names if n not in resolved)
    return resolved


def is_glob(target: str) -> bool:
    return bool(GLOB_CHARS & set(target))


def target_matches(target: str, name: str) -> bool:
    """A resolved target matches a module's own attribute name exactly (``linear_fc1``, never
    ``linear_fc10``) or, with glob characters, its whole dotted name (``*.layers.0.*.linear_qkv``)."""
    if is_glob(target):
        return fnmatch.fnmatchcase(name, target)
    return name.rsplit(".", 1)[-1] == target


_LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")


def rank_errors(r: int, shapes: Mapping[str, tuple[int, int]]) -> list[str]:
    """``--lora-r`` against the smaller dimension of each target module (``shapes``: dotted name ->
    (out, in)): one message for all the modules it exceeds, each name pattern (layer numbers as
    ``*``) once with its count and smallest dimension."""
    over = {name: min(shape) for name, shape in shapes.items() if r > min(shape)}
    if not over:
        return []
    patterns: dict[str, list[str]] = {}
    for name in over:
        patterns.setdefault(_LAYER_NUMBER.sub("*", name), []).append(name)
    parts = [f"{pattern} x{len(names)}: {min(over[n] for n in names)}" if len(names) > 1
             else f"{names[0]}: {over[names[0]]}" for pattern, names in patterns.items()]
    count = f"{len(over)} target module{'s' if len(over) > 1 else ''}"
    return [f"--lora-r {r} exceeds the smaller dimension of {count} ({', '.join(parts)}); "
            f"use --lora-r <= {min(over.values())}"]


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite: no nan, no inf, no int beyond any float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def hparam_errors(r: object, alpha: object, dropout: object) -> list[str]:
    """Every problem with the scalar hyper-parameters, one message each, naming the flag."""
    errors = []
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        errors.append(f"--lora-r must be an integer >= 1 (got {r!r})")
    if not (is_finite_number(alpha) and alpha > 0):
        errors.append(f"--lora-alpha must be a finite number > 0 (got {alpha!r})")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        errors.append(f"--lora-dropout must be in [0, 1) (got {dropout!r})")
    return errors


@dataclass(frozen=True)
class LoraConfig:
    """What ``--use-lora`` and the ``--lora-*`` flags ask for.

    ``target_modules`` keeps the user's spelling (names, HF aliases, globs); :attr:`targets` is
    the resolved list the plugin matches.  ``init_seed`` seeds every adapter's ``A`` (per module,
    independent of the TP layout); ``adapter_path`` is a PEFT directory to start from.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    use_rslora: bool = False
    only_trainable: bool = True
    recompute_input: bool = False
    verbose: bool = False
    adapter_path: str | None = None
    init_seed: int = 0

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    @property
    def targets(self) -> list[str]:
        return resolve_targets(self.target_modules)

    def errors(self) -> list[str]:
        """Every problem with this configuration, one line each naming the flag and the fix."""
        errors = hparam_errors(self.r, self.alpha, self.dropout)
        known = set(ALL_LINEAR) | set(HF_ALIASES) | {ALL_LINEAR_FLAG}
        for target in self.target_modules:
            if target not in known and not is_glob(target):
                errors.append(f"--lora-target-modules: unknown module '{target}' (use {' '.join(ALL_LINEAR)}, "
                              f"HF names like q_proj, '{ALL_LINEAR_FLAG}', or a glob such as '*.layers.0.*.linear_qkv')")
        if self.recompute_input and isinstance(self.dropout, (int, float)) and self.dropout > 0:
            errors.append("--lora-recompute-input needs --lora-dropout 0 (a dropped-out input cannot be recomputed "
                          "from the norm/SwiGLU that made it); drop one of the two flags")
        return errors

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoraConfig | None:
        """The configuration of the ``--lora-*`` flags; ``None`` without ``--use-lora``."""
        if not args.use_lora:
            return None
        return cls(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                   target_modules=tuple(args.lora_target_modules), use_rslora=args.lora_use_rslora,
                   only_trainable=args.lora_only_trainable, recompute_input=args.lora_recompute_input,
                   verbose=args.lora_verbose, adapter_path=args.lora_adapter_path, init_seed=args.seed)
