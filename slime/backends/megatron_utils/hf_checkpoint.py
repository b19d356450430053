"""Hugging Face checkpoint files: the shapes ``config.json`` implies, a validated reader, a writer.

The reader and the writer handle ``model.safetensors`` (or the shards of its index) only; what
the tensors mean for Megatron is :mod:`slime.backends.megatron_utils.hf_convert`'s business.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slime.backends.megatron_utils.arch import ModelArch
from slime.utils.atomic import write_dir_atomically
from slime.utils.errors import UserError
from slime.utils.hf_names import HF_LAYER_PREFIX

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


def hf_param_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """HF parameter name (per-layer names without the ``model.layers.N.`` prefix) -> its shape."""
    h, f, d, v = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim, arch.vocab_size
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    experts: dict[str, tuple[int, ...]] = {"mlp.gate.weight": (arch.num_experts, h)} if arch.is_moe else {}
    for e in range(arch.num_experts):
        i = arch.moe_ffn_hidden_size
        experts.update({f"mlp.experts.{e}.gate_proj.weight": (i, h), f"mlp.experts.{e}.up_proj.weight": (i, h),
                        f"mlp.experts.{e}.down_proj.weight": (h, i)})
    return experts | {
        "model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q), "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }


def hf_shape_key(hf_name: str) -> str:
    """``model.layers.7.mlp.up_proj.weight`` -> ``mlp.up_proj.weight``; global names unchanged."""
    if hf_name.startswith(HF_LAYER_PREFIX + "."):
        return hf_name.split(".", 3)[3]
    return hf_name


class CheckpointReader:
    """Lazy, validated access to the tensors of an HF checkpoint directory.

    ``model.safetensors`` is preferred (as transformers does); otherwise the shards listed in
    ``model.safetensors.index.json``.  Every failure is a one-line :class:`UserError` naming
    the file and the tensor.  Pickled weights (``*.bin``) are never read.
    """

    def __init__(self, checkpoint_dir: str | Path, arch: ModelArch) -> None:
        self.dir = Path(checkpoint_dir)
        self.shapes = hf_param_shapes(arch)
        self._handles: dict[Path, object] = {}
        self.files = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        single, index = self.dir / _SINGLE_FILE, self.dir / _INDEX_FILE
        if single.is_file():
            return {name: single for name in self._open(single).keys()}
        if not index.is_file():
            raise UserError(f"--hf-checkpoint {self.dir}: neither {_SINGLE_FILE} nor {_INDEX_FILE} there; "
                            "save the model with safetensors (save_pretrained(..., safe_serialization=True))")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{index}: not a safetensors index with a 'weight_map' ({exc!r}); re-save the checkpoint") from None
        return {name: self.dir / file for name, file in weight_map.items()}

    def _open(self, path: Path):
        if path not in self._handles:
            from safetensors import safe_open

            if not path.is_file():
                raise UserError(f"{path}: listed in {_INDEX_FILE} but missing; re-download the checkpoint")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error type (and OSError)
                raise UserError(f"{path}: not a readable safetensors file ({exc}); it is corrupt or truncated, "
                                "re-download or re-save it") from None
        return self._handles[path]

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, after checking it exists and has the shape config.json implies."""
        path = self.files.get(name)
        if path is None:
            raise UserError(f"--hf-checkpoint {self.dir}: tensor {name} is missing from the weights; "
                            "the safetensors do not belong to the model in config.json")
        handle = self._open(path)
        try:
            shape = tuple(handle.get_slice(name).get_shape())
            expected = self.shapes.get(hf_shape_key(name))
            if expected is not None and shape != expected:
                raise UserError(f"{path}: tensor {name} has shape {list(shape)} but {self.dir / 'config.json'} "
                                f"implies {list(expected)}; the weights belong to a different model than config.json")
            return handle.get_tensor(name)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{path}: cannot read tensor {name} ({exc}); the file is corrupt, re-download it") from None


def save_hf_checkpoint(state_dict: dict[str, torch.Tensor], arch_config_dict: dict, out_dir: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir``, atomically.

    A new ``out_dir`` appears whole; in an existing one (e.g. holding a tokenizer) the two files
    are replaced and the rest kept (:func:`slime.utils.atomic.write_dir_atomically`).
    """
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:  # safetensors refuses tensors sharing memory (e.g. a tied lm_head)
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor

    def fill(staging: Path) -> None:
        save_file(tensors, str(staging / _SINGLE_FILE), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(arch_config_dict, indent=2, sort_keys=True) + "\n")

    return write_dir_atomically(out_dir, fill, keep_other_files=True)
