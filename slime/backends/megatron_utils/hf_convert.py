"""Megatron-core <-> Hugging Face: parameter names, fused layouts, tensor-parallel shards.

Every conversion lives here, driven by the explicit tables below.  Notation: ``H`` attention
heads, ``G`` query groups (KV heads), ``n = H / G``, ``d`` head_dim, ``F`` FFN size, ``V`` vocab,
``T`` tensor-parallel (TP) size.  All fusions act on dim 0, the output rows, so they apply
alike to weights ``[out, in]``, biases ``[out]`` and LoRA B matrices ``[out, r]``:

    linear_qkv [(H + 2G) d, .] = for g in 0..G-1: [q heads g*n .. g*n+n-1 ; k head g ; v head g]
    linear_fc1 [2F, .]         = [gate_proj ; up_proj]

How each parameter kind is split over TP rank ``t`` (Megatron's *global* layout is what the
fusions above produce; a rank holds a *local* shard of it):

    COLUMN        linear_qkv            rows, contiguous chunk t (= G/T whole query groups)
    COLUMN_GATED  linear_fc1            [gate chunk t ; up chunk t]  (not a chunk of [gate ; up])
    ROW           linear_proj, fc2      columns (dim 1), chunk t
    VOCAB         word_embeddings,      rows of the vocab zero-padded to ``arch.padded_vocab_size(T)``,
                  output_layer          chunk t
    REPLICATED    norms, LoRA A of column layers, LoRA B (and biases) of row layers,
                  MoE routers, and every expert parameter (experts are whole on a rank:
                  expert TP is 1; expert parallelism splits the experts, not the tensors)

Expert parameters are named by the *global* expert index on the HF side and in every table
here; a rank's modules number its experts from 0 (:func:`local_expert_offset` maps them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from slime.backends.megatron_utils.arch import ModelArch
from slime.backends.megatron_utils.hf_checkpoint import CheckpointReader
from slime.backends.megatron_utils.parallel import (
    expert_groups,
    gather_over_group,
    gather_pipeline_stages,
    tp_group_rank_size,
    unwrap_model,
)
from slime.utils.errors import UserError
from slime.utils.hf_names import (
    EXPERT_PREFIX,
    HF_LAYER_PREFIX,
    MEGATRON_TO_HF_GLOBAL,
    MEGATRON_TO_HF_LAYER,
    expert_module,
    hf_expert_modules,
    leaf,
    split_expert,
)

COLUMN = "column"
COLUMN_GATED = "column_gated"
ROW = "row"
VOCAB = "vocab"
REPLICATED = "replicated"
PARAM_KINDS: tuple[str, ...] = (COLUMN, COLUMN_GATED, ROW, VOCAB, REPLICATED)

# A module's attribute name -> how its weight is split over TP.
_LEAF_KIND: dict[str, str] = {
    "linear_qkv": COLUMN,
    "linear_fc1": COLUMN_GATED,
    "linear_proj": ROW,
    "linear_fc2": ROW,
    "word_embeddings": VOCAB,
    "output_layer": VOCAB,
}
_PARAM_NAMES = ("weight", "bias", "lora_A", "lora_B")
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.([^.]+)$")
_CHUNK_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_CHUNK_EXPERT = re.compile(re.escape(EXPERT_PREFIX) + r"(\d+)\.")


# ----------------------------------------------------------------------------- names and kinds


def split_megatron_name(name: str) -> tuple[int | None, str, str]:
    """``decoder.layers.3.mlp.linear_fc1.weight`` -> ``(3, "mlp.linear_fc1", "weight")``;
    ``output_layer.weight`` -> ``(None, "output_layer", "weight")``.  The layer is the index in
    the chunk's state dict (local to a pipeline stage)."""
    match = _LAYER_KEY.match(name)
    if match:
        return int(match.group(1)), match.group(2), match.group(3)
    module, _, param = name.rpartition(".")
    return None, module, param


def megatron_param_kind(megatron_name: str) -> str:
    """The TP split (one of :data:`PARAM_KINDS`) of a Megatron parameter.

    Accepts full parameter names (``...linear_qkv.weight``, ``...linear_qkv.lora_B``,
    ``...linear_qkv.base_layer.weight``) or module names (``...linear_fc1``, taken as weight).
    """
    parts = [p for p in megatron_name.split(".") if p != "base_layer"]
    param = parts.pop() if parts and parts[-1] in _PARAM_NAMES else "weight"
    if EXPERT_PREFIX in ".".join(parts) + ".":
        return REPLICATED  # whole experts on each rank
    kind = _LEAF_KIND.get(parts[-1] if parts else "", REPLICATED)
    # LoRA A of a column layer sees the full (replicated) input; B of a row layer sees the reduced
    # output; a row layer's bias is added after the reduction.
    if kind in (COLUMN, COLUMN_GATED) and param == "lora_A":
        return REPLICATED
    if kind == ROW and param in ("bias", "lora_B"):
        return REPLICATED
    return kind


def hf_names(layer: int | None, module: str, param: str) -> tuple[str, ...]:
    """HF parameter names of one Megatron parameter; ``layer`` is the *global* layer index, and an
    expert's ``module`` carries the *global* expert index."""
    expert = split_expert(module) if layer is not None else None
    if expert is not None:
        return tuple(f"{HF_LAYER_PREFIX}.{layer}.{m}.{param}" for m in hf_expert_modules(*expert))
    if layer is None:
        modules = MEGATRON_TO_HF_GLOBAL.get(module)
        prefix = ""
    else:
        modules = MEGATRON_TO_HF_LAYER.get(module)
        prefix = f"{HF_LAYER_PREFIX}.{layer}."
    if modules is None:
        raise KeyError(f"no Hugging Face name for Megatron module {module!r} (layer {layer})")
    return tuple(f"{prefix}{m}.{param}" for m in modules)


# ----------------------------------------------------------------------------- fused layouts


def _qkv_dims(arch: ModelArch) -> tuple[int, int, int]:
    groups = arch.num_query_groups
    return groups, arch.num_attention_heads // groups, arch.head_dim


def qkv_hf_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """``q [H d, *]``, ``k [G d, *]``, ``v [G d, *]`` -> ``[(H + 2G) d, *]``, grouped per query group."""
    groups, n, d = _qkv_dims(arch)
    rest = q.shape[1:]
    if q.shape[0] != groups * n * d or k.shape[0] != groups * d or v.shape[0] != groups * d:
        raise ValueError(f"q/k/v rows {q.shape[0]}/{k.shape[0]}/{v.shape[0]} do not fit H={groups * n}, G={groups}, d={d}")
    per_group = [q.reshape(groups, n * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)]
    return torch.cat(per_group, dim=1).reshape(groups * (n + 2) * d, *rest)


def qkv_megatron_to_hf(fused: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`qkv_hf_to_megatron`: ``[(H + 2G) d, *]`` -> ``(q, k, v)``."""
    groups, n, d = _qkv_dims(arch)
    rest = fused.shape[1:]
    q, k, v = fused.reshape(groups, (n + 2) * d, *rest).split([n * d, d, d], dim=1)
    return q.reshape(groups * n * d, *rest), k.reshape(groups * d, *rest), v.reshape(groups * d, *rest)


def fc1_hf_to_megatron(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gate [F, *]``, ``up [F, *]`` -> ``[gate ; up]`` of shape ``[2F, *]``."""
    return torch.cat([gate, up], dim=0)


def fc1_megatron_to_hf(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[gate ; up]`` -> ``(gate, up)``."""
    gate, up = fused.chunk(2, dim=0)
    return gate, up


def megatron_from_hf(module: str, hf_tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """The Megatron global tensor of ``module`` from its HF tensors (in table order)."""
    if leaf(module) == "linear_qkv":
        return qkv_hf_to_megatron(*hf_tensors, arch)
    if leaf(module) == "linear_fc1":
        return fc1_hf_to_megatron(*hf_tensors)
    (tensor,) = hf_tensors
    return tensor


def hf_from_megatron(module: str, tensor: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`megatron_from_hf` (vocab padding is the caller's business)."""
    if leaf(module) == "linear_qkv":
        return qkv_megatron_to_hf(tensor, arch)
    if leaf(module) == "linear_fc1":
        return fc1_megatron_to_hf(tensor)
    return (tensor,)


# ----------------------------------------------------------------------------- tensor parallelism


def _chunk(tensor: torch.Tensor, rank: int, size: int, dim: int) -> torch.Tensor:
    if tensor.shape[dim] % size:
        raise ValueError(f"dim {dim} of a {tuple(tensor.shape)} tensor does not split into {size} TP shards")
    return tensor.chunk(size, dim=dim)[rank]


def pad_vocab_rows(tensor: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Append zero rows up to ``padded_rows`` (padded tokens get logit 0 and are stripped later)."""
    missing = padded_rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(missing, *tensor.shape[1:])], dim=0)


def tp_shard(kind: str, full: torch.Tensor, tp_rank: int, tp_size: int, *,
             padded_rows: int | None = None) -> torch.Tensor:
    """Rank ``tp_rank``'s shard of a Megatron global tensor (see the module docstring).

    For :data:`VOCAB`, rows are zero-padded to ``padded_rows`` first (default: the next
    multiple of ``tp_size``, as :meth:`ModelArch.padded_vocab_size`).
    """
    if kind == REPLICATED:
        return full
    if kind == COLUMN:
        return _chunk(full, tp_rank, tp_size, 0)
    if kind == COLUMN_GATED:
        gate, up = fc1_megatron_to_hf(full)
        return torch.cat([_chunk(gate, tp_rank, tp_size, 0), _chunk(up, tp_rank, tp_size, 0)], dim=0)
    if kind == ROW:
        return _chunk(full, tp_rank, tp_size, 1)
    if kind == VOCAB:
        rows = padded_rows if padded_rows is not None else -(-full.shape[0] // tp_size) * tp_size
        return _chunk(pad_vocab_rows(full, rows), tp_rank, tp_size, 0)
    raise ValueError(f"unknown parameter kind {kind!r}; expected one of {PARAM_KINDS}")


def fc1_local_to_global(shards: list[torch.Tensor]) -> torch.Tensor:
    """``[gate_t ; up_t]`` for t = 0..T-1 -> ``[gate_0 ; ... ; gate_{T-1} ; up_0 ; ... ; up_{T-1}]``."""
    halves = [shard.chunk(2, dim=0) for shard in shards]
    return torch.cat([g for g, _ in halves] + [u for _, u in halves], dim=0)


def tp_gather(kind: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`tp_shard` over all ranks' shards (vocab padding kept)."""
    if kind == REPLICATED:
        return shards[0]
    if kind in (COLUMN, VOCAB):
        return torch.cat(shards, dim=0)
    if kind == COLUMN_GATED:
        return fc1_local_to_global(shards)
    if kind == ROW:
        return torch.cat(shards, dim=1)
    raise ValueError(f"unknown parameter kind {kind!r}; expected one of {PARAM_KINDS}")


def gather_tp(local: torch.Tensor, kind: str, group=None) -> torch.Tensor:
    """All-gather this rank's shard over the TP ``group`` (default: megatron's) and return the
    full tensor in Megatron's global layout (vocab padding kept).  Collective: every rank calls it."""
    if group is None:
        group, _, size = tp_group_rank_size()
    else:
        size = dist.get_world_size(group)
    if size == 1 or kind == REPLICATED:
        return local
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local.detach().contiguous(), group=group)
    return tp_gather(kind, shards)


# ----------------------------------------------------------------------------- model <-> HF


def _is_weight_key(key: str) -> bool:
    """Base parameters only: no LoRA tensors, no TransformerEngine-style ``_extra_state``."""
    return not key.endswith(("._extra_state", ".lora_A", ".lora_B"))


def global_layer_indices(model: nn.Module) -> dict[int, int]:
    """State-dict layer index of this chunk -> global 0-based layer (megatron's 1-based
    ``layer_number`` already includes the pipeline-stage offset)."""
    return {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}


def local_experts(model: nn.Module) -> list[int]:
    """Global indices of this rank's experts (megatron's ``local_expert_indices``); ``[]`` for dense models."""
    for layer in getattr(getattr(model, "decoder", None), "layers", []):
        indices = getattr(layer.mlp, "local_expert_indices", None)
        if indices:
            return [int(i) for i in indices]
    return []


def local_expert_offset(model: nn.Module) -> int:
    """The global index of this rank's expert 0; 0 for dense models."""
    return (local_experts(model) or [0])[0]


def global_module(module: str, expert_offset: int) -> str:
    """A chunk's module name with its expert index made global (other names unchanged)."""
    expert = split_expert(module)
    return module if expert is None else expert_module(expert[0] + expert_offset, expert[1])


def whole_model_name(model: nn.Module):
    """A function: dotted name in this chunk -> the name in the whole, unsplit model (global layer
    and expert indices), e.g. ``decoder.layers.0.mlp.experts.local_experts.1.linear_fc1`` on the
    second of two stages and expert ranks -> ``decoder.layers.2.mlp.experts.local_experts.3.linear_fc1``."""
    layers, offset = global_layer_indices(model), local_expert_offset(model)

    def name(local: str) -> str:
        local = _CHUNK_LAYER.sub(lambda m: f"decoder.layers.{layers.get(int(m[1]), int(m[1]))}.", local, count=1)
        return _CHUNK_EXPERT.sub(lambda m: f"{EXPERT_PREFIX}{int(m[1]) + offset}.", local, count=1)

    return name


def _hf_names_of_key(key: str, layers: dict[int, int], expert_offset: int, arch: ModelArch) -> tuple[str, tuple[str, ...]]:
    """A chunk's state-dict key -> (its module, the HF names it is made of)."""
    layer, module, param = split_megatron_name(key)
    if module == "output_layer" and arch.tie_word_embeddings:
        # Tied: the output layer (present on the last stage under PP) is the embedding.
        return module, hf_names(None, "embedding.word_embeddings", param)
    return module, hf_names(None if layer is None else layers[layer], global_module(module, expert_offset), param)


def _check_tied(reader: CheckpointReader) -> None:
    if reader.has("lm_head.weight") and not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
        raise UserError(f"{reader.dir / 'config.json'}: tie_word_embeddings is true but lm_head.weight differs from "
                        "model.embed_tokens.weight; set tie_word_embeddings to false in config.json")


@torch.no_grad()
def load_hf_weights(chunks: Iterable[nn.Module], arch: ModelArch, checkpoint_dir: str | Path) -> None:
    """Copy an HF checkpoint into this rank's model chunks (its TP shard, its PP layers).

    Parameters are addressed by the chunks' ``state_dict()`` names, which stay the base names
    with LoRA (``LoRALinear`` maps ``x.weight`` onto ``x.base_layer.weight``); adapters keep
    their initial values.  Tensors are converted to each parameter's dtype by ``copy_``.
    """
    reader = CheckpointReader(checkpoint_dir, arch)
    _, tp_rank, tp_size = tp_group_rank_size()
    if arch.tie_word_embeddings:
        _check_tied(reader)
    for chunk in chunks:
        model = unwrap_model(chunk)
        layers, offset = global_layer_indices(model), local_expert_offset(model)
        incoming: dict[str, torch.Tensor] = {}
        for key, local in model.state_dict().items():
            if not _is_weight_key(key):
                continue
            module, names = _hf_names_of_key(key, layers, offset, arch)
            full = megatron_from_hf(module, [reader.get(n) for n in names], arch)
            shard = tp_shard(megatron_param_kind(key), full, tp_rank, tp_size,
                             padded_rows=arch.padded_vocab_size(tp_size))
            if shard.shape != local.shape:
                raise UserError(f"--hf-checkpoint {reader.dir}: {', '.join(names)} give {key} the shape "
                                f"{list(shard.shape)} but the model needs {list(local.shape)}; config.json and weights disagree")
            incoming[key] = shard
        result = model.load_state_dict(incoming, strict=False)
        missing = [k for k in result.missing_keys if _is_weight_key(k)]
        if missing or result.unexpected_keys:  # our tables are wrong, not the user's files
            raise RuntimeError(f"load_hf_weights: missing {missing}, unexpected {result.unexpected_keys}")


@torch.no_grad()
def export_hf_weights(chunks: Iterable[nn.Module], arch: ModelArch) -> dict[str, torch.Tensor]:
    """The full HF-named state dict (CPU tensors, the model's dtype) of a possibly TP/PP-split model.

    Collective over the TP group, the expert-parallel group and the PP group: every rank must
    call it, and every rank gets the whole dict (PP stages and EP ranks are all-gathered).  Vocab padding is stripped;
    ``lm_head.weight`` is omitted when embeddings are tied.  LoRA layers contribute their base
    weight as it is: unmerged, unless the caller merged the adapters first.
    """
    out: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        model = unwrap_model(chunk)
        layers, offset = global_layer_indices(model), local_expert_offset(model)
        for key, local in model.state_dict().items():
            _, module, _ = split_megatron_name(key)
            if not _is_weight_key(key) or (module == "output_layer" and arch.tie_word_embeddings):
                continue
            kind = megatron_param_kind(key)
            full = gather_tp(local, kind)
            if kind == VOCAB:
                full = full[: arch.vocab_size]
            _, names = _hf_names_of_key(key, layers, offset, arch)
            for name, tensor in zip(names, hf_from_megatron(module, full, arch)):
                # Own, contiguous storage: no aliasing of the model, and safetensors-savable.
                out[name] = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return gather_pipeline_stages(gather_expert_ranks(out))


def gather_expert_ranks(rank_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every expert-parallel rank's part of an HF-named dict, merged on each of them (collective
    over the expert-parallel group; dense entries are identical on those ranks)."""
    return gather_over_group(rank_dict, expert_groups()[0])


# ----------------------------------------------------------------------------- writing checkpoints
