"""Merge a PEFT LoRA adapter into its base model: a plain HF checkpoint for engines without LoRA.

For every adapted module ``m`` of the adapter, ``W_m += s_m * B_m @ A_m`` (``s_m`` from
``lora_alpha``/``r``, rsLoRA and ``rank_pattern``/``alpha_pattern`` as peft computes it), done in
fp32 and cast back to the checkpoint's dtype.  Everything works on the safetensors files
directly (single or sharded with ``model.safetensors.index.json``); no model class is built.
Every other file of the base directory (config, tokenizer, generation config, index) is copied.
The output directory is written next to its final place and renamed in atomically.

Usage::

    python tools/merge_lora.py --hf-checkpoint BASE --adapter ADAPTER_DIR --output MERGED_DIR
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from slime.utils.atomic import write_dir_atomically
from slime.utils.errors import UserError, run_main
from slime.utils.peft_format import PeftAdapter, foreign_base_error, read_peft_adapter


def weight_files(base: Path) -> list[Path]:
    """The checkpoint's safetensors files; a pickled-only checkpoint is refused."""
    if not (base / "config.json").is_file():
        raise UserError(f"--hf-checkpoint {base}: no config.json there; point it at a Hugging Face model directory")
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise UserError(f"--hf-checkpoint {base}: no *.safetensors weights (pickled .bin is never read); "
                        "re-save the model with safe_serialization=True")
    return files


def _load(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{file}: corrupt or truncated safetensors file ({exc})") from None


def merge_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, where: str,
                module: str) -> torch.Tensor:
    """``weight + scaling * B @ A`` (``B: [out, r]``, ``A: [r, in]``, ``weight: [out, in]``), computed in fp32."""
    if (b.shape[0], a.shape[1]) != tuple(weight.shape):
        raise UserError(foreign_base_error(where, module, a, b, weight.shape))
    merged = weight.float() + scaling * (b.float() @ a.float())
    return merged.to(weight.dtype)


def merge_lora(base: str | Path, adapter_dir: str | Path, output: str | Path) -> Path:
    """Write ``base`` with ``adapter_dir`` merged into ``output`` (replacing it atomically); return ``output``."""
    base, output = Path(base), Path(output)
    if output.resolve() == base.resolve():
        raise UserError(f"--output {output}: must differ from --hf-checkpoint (the base is read while writing)")
    adapter = read_peft_adapter(adapter_dir)
    files = weight_files(base)
    located = _locate_modules(adapter, files)

    def write(staging: Path) -> None:
        for item in base.iterdir():
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy2(item, staging / item.name)
        for file in files:
            _write_merged_file(file, staging / file.name, adapter, located.get(file, []))

    return write_dir_atomically(output, write)


def _locate_modules(adapter: PeftAdapter, files: Sequence[Path]) -> dict[Path, list[str]]:
    """Which file holds each adapted module's ``<module>.weight``.

    An adapter of another base model is reported as that (a module whose ``B A`` does not fit
    the base weight, both shapes named) before any module the base lacks.
    """
    where: dict[str, tuple[Path, list[int]]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                where.update((key, (file, handle.get_slice(key).get_shape())) for key in handle.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{file}: corrupt or truncated safetensors file ({exc})") from None
    for module, (a, b) in adapter.modules.items():
        found = where.get(f"{module}.weight")
        if found is not None and [b.shape[0], a.shape[1]] != list(found[1]):
            raise UserError(foreign_base_error(adapter.path, module, a, b, found[1]))
    located: dict[Path, list[str]] = {}
    for module in adapter.modules:
        found = where.get(f"{module}.weight")
        if found is None:
            raise UserError(f"{adapter.path}: module {module} is not in the base checkpoint "
                            f"(no {module}.weight); the adapter was trained on another model")
        located.setdefault(found[0], []).append(module)
    return located


def _write_merged_file(src: Path, dst: Path, adapter: PeftAdapter, modules: list[str]) -> None:
    tensors, metadata = _load(src)
    for module in modules:
        a, b = adapter.modules[module]
        tensors[f"{module}.weight"] = merge_delta(tensors[f"{module}.weight"], a, b, adapter.scaling(module),
                                                  where=str(adapter.path), module=module)
    save_file(tensors, str(dst), metadata=metadata or {"format": "pt"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-checkpoint", required=True, help="base Hugging Face model directory (safetensors)")
    parser.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + safetensors)")
    parser.add_argument("--output", required=True, help="merged checkpoint directory (replaced atomically)")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    out = merge_lora(args.hf_checkpoint, args.adapter, args.output)
    print(f"merged {args.adapter} into {args.hf_checkpoint} -> {out}")
    return out


if __name__ == "__main__":
    run_main(main)
