"""Exact parameter counts of LoRA on the fused Megatron modules.

For a model preset (``--model``) or a Hugging Face checkpoint directory
(``--hf-checkpoint``, only its ``config.json`` is read) this prints the base
model's total parameter count and, for each ``--lora-r``, how many parameters
LoRA trains on the chosen ``--lora-target-modules``.

The counts are what the fused Megatron modules train: one adapter per fused
module, ``A: [r, in]`` and ``B: [out, r]``.  Fusing shares ``A`` across q/k/v
(``linear_qkv``) and across gate/up (``linear_fc1``), so per layer, with
``h`` = hidden, ``f`` = FFN width, ``n_q``/``n_kv`` heads and ``d`` = head_dim::

    linear_qkv  r * (h + (n_q + 2 n_kv) d)
    linear_proj r * (n_q d + h)
    linear_fc1  r * (h + 2 f)
    linear_fc2  r * (f + h)

peft on the unfused HF model trains more: it has a separate ``A`` for each of
q, k, v, gate and up.

Mixture of experts (Qwen3-MoE, ``model_type`` ``qwen3_moe``; only models with an
MoE block in every layer: ``decoder_sparse_step`` 1, empty ``mlp_only_layers``,
no shared experts).  Each layer has the attention above, a frozen router
``[E, h]`` and ``E`` experts, each a gated MLP of width ``I`` =
``moe_intermediate_size``: ``linear_fc1 [2I, h]`` and ``linear_fc2 [h, I]``.
LoRA matches modules by name, so ``linear_fc1``/``linear_fc2`` put one adapter on
every expert (its own ``A`` and ``B``) and none on the router; per layer::

    experts' linear_fc1  E * r * (h + 2 I)
    experts' linear_fc2  E * r * (I + h)

and the base model has, per layer, ``E h`` (router) ``+ 3 E h I`` (experts)
instead of the dense MLP's ``3 h f``.  Active parameters per token count
``k`` = ``num_experts_per_tok`` experts instead of ``E``.

The trainable percentage follows peft's ``print_trainable_parameters``:
LoRA parameters over all parameters of the adapted model (base + LoRA).

Usage::

    python tools/lora_param_count.py --model qwen3-0.6b qwen3-4b --lora-r 8 16 32
    python tools/lora_param_count.py --model qwen3-30b-a3b --lora-r 16
    python tools/lora_param_count.py --hf-checkpoint DIR --lora-r 16 --json

From Python, :func:`count_lora_params` gives a :class:`LoraCount` (base,
attention, dense MLP and expert LoRA parameters, and their ``total``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from slime.utils.errors import UserError, run_main

from slime.utils.lora_config import ALL_LINEAR as MEGATRON_TARGETS
from slime.utils.lora_config import ALL_LINEAR_FLAG as ALL_LINEAR
from slime.utils.lora_config import HF_ALIASES
from slime.utils.lora_config import resolve_targets as resolve_flag_targets

_QWEN3_BASE = {
    "model_type": "qwen3",
    "head_dim": 128,
    "num_key_value_heads": 8,
    "vocab_size": 151936,
    "attention_bias": False,
}

# Published config.json values (architecture fields only).
PRESETS: dict[str, dict] = {
    "qwen3-0.6b": {**_QWEN3_BASE, "num_hidden_layers": 28, "hidden_size": 1024,
                   "intermediate_size": 3072, "num_attention_heads": 16, "tie_word_embeddings": True},
    "qwen3-1.7b": {**_QWEN3_BASE, "num_hidden_layers": 28, "hidden_size": 2048,
                   "intermediate_size": 6144, "num_attention_heads": 16, "tie_word_embeddings": True},
    "qwen3-4b": {**_QWEN3_BASE, "num_hidden_layers": 36, "hidden_size": 2560,
                 "intermediate_size": 9728, "num_attention_heads": 32, "tie_word_embeddings": True},
    "qwen3-8b": {**_QWEN3_BASE, "num_hidden_layers": 36, "hidden_size": 4096,
                 "intermediate_size": 12288, "num_attention_heads": 32, "tie_word_embeddings": False},
    "qwen3-14b": {**_QWEN3_BASE, "num_hidden_layers": 40, "hidden_size": 5120,
                  "intermediate_size": 17408, "num_attention_heads": 40, "tie_word_embeddings": False},
    "qwen3-32b": {**_QWEN3_BASE, "num_hidden_layers": 64, "hidden_size": 5120,
                  "intermediate_size": 25600, "num_attention_heads": 64, "tie_word_embeddings": False},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048,
                      "intermediate_size": 6144, "num_attention_heads": 32, "num_key_value_heads": 4,
                      "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False,
                      "attention_bias": False, "moe_intermediate_size": 768, "num_experts": 128,
                      "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
                      "mlp_only_layers": []},
    "smollm2-135m": {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
                     "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
                     "attention_bias": False, "mlp_bias": False},
}

# Decoder families whose layer layout the counts below describe (qwen3_moe: every layer MoE).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
MOE_MODEL_TYPES = ("qwen3_moe",)
ATTENTION_TARGETS = ("linear_qkv", "linear_proj")
MLP_TARGETS = ("linear_fc1", "linear_fc2")
# Config keys that would add shared experts (Qwen2-MoE, DeepSeek style): not modelled here.
SHARED_EXPERT_KEYS = ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts")


@dataclass(frozen=True)
class Dims:
    """The architecture numbers that determine parameter counts."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qk_norm: bool  # Qwen3: RMSNorm of size head_dim on q and on k, per layer
    qkv_bias: bool
    proj_bias: bool
    mlp_bias: bool
    experts: int = 0  # E; 0: a dense MLP in every layer
    expert_ffn: int = 0  # I = moe_intermediate_size
    experts_per_token: int = 0  # k = num_experts_per_tok

    @property
    def moe(self) -> bool:
        return self.experts > 0


@dataclass(frozen=True)
class LoraCount:
    """Parameter counts of one model and LoRA setting, over all layers.

    ``base``: the base model; ``attention``: LoRA on ``linear_qkv``/``linear_proj``;
    ``mlp``: LoRA on the dense ``linear_fc1``/``linear_fc2`` (0 for MoE);
    ``experts``: LoRA on every expert's ``linear_fc1``/``linear_fc2`` (0 for dense).
    """

    base: int
    attention: int
    mlp: int
    experts: int

    @property
    def total(self) -> int:
        """All LoRA parameters: ``attention + mlp + experts``."""
        return self.attention + self.mlp + self.experts


def moe_fields(config: dict) -> dict:
    """``experts``, ``expert_ffn``, ``experts_per_token`` of a Qwen3-MoE config (transformers'
    defaults for absent keys); a layout other than "every layer MoE, no shared expert" is a UserError."""
    fix = "pass --hf-checkpoint of a Qwen3-MoE model with an MoE block in every layer"
    step = config.get("decoder_sparse_step", 1)
    if step != 1:
        raise UserError(f"config.json: decoder_sparse_step is {step}, so some layers are dense; "
                        f"only decoder_sparse_step 1 is supported; {fix}")
    if config.get("mlp_only_layers"):
        raise UserError(f"config.json: mlp_only_layers is {config['mlp_only_layers']}, so those layers are "
                        f"dense; only an empty mlp_only_layers is supported; {fix}")
    shared = [key for key in SHARED_EXPERT_KEYS if (config.get(key) or 0) > 0]
    if shared:
        raise UserError(f"config.json: {shared[0]} is {config[shared[0]]}; shared experts are not "
                        f"supported; {fix}")
    # transformers 5 writes num_experts as num_local_experts (its attribute_map); the Hub's files have num_experts.
    experts = config.get("num_experts", config.get("num_local_experts", 128))
    fields = dict(experts=int(experts),
                  expert_ffn=int(config.get("moe_intermediate_size", 768)),
                  experts_per_token=int(config.get("num_experts_per_tok", 8)))
    if fields["experts"] < 1 or not 1 <= fields["experts_per_token"] <= fields["experts"]:
        raise UserError(f"config.json: num_experts {fields['experts']} and num_experts_per_tok "
                        f"{fields['experts_per_token']} do not describe an MoE layer "
                        "(need 1 <= num_experts_per_tok <= num_experts); " + fix)
    return fields


def dims_from_config(config: dict) -> Dims:
    """Read a HF ``config.json`` dict, applying transformers' defaults for absent keys."""
    model_type = config.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)}); "
            "pass --model or --hf-checkpoint of a Llama/Mistral/Qwen2/Qwen3 or Qwen3-MoE model"
        )
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        dims = dict(
            layers=int(config["num_hidden_layers"]),
            ffn=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
        )
    except KeyError as exc:
        raise UserError(f"config.json lacks {exc.args[0]!r}; pass --hf-checkpoint of a complete HF checkpoint")
    default_head_dim = 128 if model_type == "qwen3" else hidden // heads
    attention_bias = bool(config.get("attention_bias", False))
    if model_type in MOE_MODEL_TYPES:
        dims.update(moe_fields(config))
    return Dims(
        hidden=hidden,
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or default_head_dim),
        tied=bool(config.get("tie_word_embeddings", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        # Qwen2 hard-codes a q/k/v bias and no o_proj bias; the others follow `attention_bias`.
        qkv_bias=model_type == "qwen2" or attention_bias,
        proj_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=model_type == "llama" and bool(config.get("mlp_bias", False)),
        **dims,
    )


def linear_shapes(d: Dims) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each fused Megatron linear in one layer; for MoE,
    ``linear_fc1``/``linear_fc2`` are one expert's (there are :func:`copies` of them)."""
    q_out, kv_out = d.heads * d.head_dim, d.kv_heads * d.head_dim
    ffn = d.expert_ffn if d.moe else d.ffn
    return {
        "linear_qkv": (d.hidden, q_out + 2 * kv_out),
        "linear_proj": (q_out, d.hidden),
        "linear_fc1": (d.hidden, 2 * ffn),  # [gate; up]
        "linear_fc2": (ffn, d.hidden),
    }


def copies(d: Dims, name: str, active: bool = False) -> int:
    """How many of module ``name`` one layer has: ``E`` experts' fc1/fc2 for MoE
    (``k`` with ``active``: those one token runs through), else 1."""
    if d.moe and name in MLP_TARGETS:
        return d.experts_per_token if active else d.experts
    return 1


def base_param_count(d: Dims, active: bool = False) -> int:
    """All parameters of the base model: embedding, layers (with the router ``E h`` for
    MoE), final norm, untied output layer.  ``active``: only ``k`` experts per layer."""
    shapes = linear_shapes(d)
    biases = {"linear_qkv": d.qkv_bias, "linear_proj": d.proj_bias,
              "linear_fc1": d.mlp_bias, "linear_fc2": d.mlp_bias}
    per_layer = sum(copies(d, name, active) * (i * o + (o if biases[name] else 0))
                    for name, (i, o) in shapes.items())
    per_layer += 2 * d.hidden  # input and post-attention RMSNorm
    per_layer += d.experts * d.hidden  # router [E, h] (0 when dense)
    if d.qk_norm:
        per_layer += 2 * d.head_dim
    embedding = d.vocab * d.hidden
    output_layer = 0 if d.tied else d.vocab * d.hidden
    return embedding + d.layers * per_layer + d.hidden + output_layer


def lora_param_count(d: Dims, r: int, targets: Sequence[str]) -> int:
    """LoRA parameters on the fused modules: ``layers * sum_t copies_t * r * (in_t + out_t)``."""
    shapes = linear_shapes(d)
    return d.layers * sum(copies(d, t) * r * (shapes[t][0] + shapes[t][1]) for t in targets)


def resolve_targets(names: Sequence[str]) -> list[str]:
    """Map Megatron names, HF aliases and ``all-linear`` (comma lists allowed) to
    the fused Megatron module names, in canonical order, each once."""
    parts = [part.strip() for item in names for part in item.split(",") if part.strip()]
    unknown = [name for name in parts if name not in (*MEGATRON_TARGETS, *HF_ALIASES, ALL_LINEAR)]
    if unknown:
        known = ", ".join([*HF_ALIASES, *MEGATRON_TARGETS, ALL_LINEAR])
        raise UserError(f"--lora-target-modules: unknown module {unknown[0]!r} (known: {known})")
    if not parts:
        raise UserError("--lora-target-modules: no module given")
    chosen = set(resolve_flag_targets(parts))
    return [t for t in MEGATRON_TARGETS if t in chosen]


def count_lora_params(config: dict, r: int, targets: Sequence[str]) -> LoraCount:
    """Base and LoRA parameter counts for a HF ``config.json`` dict, rank ``r`` and
    target names (Megatron names, HF aliases or ``all-linear``)."""
    if r < 1:
        raise UserError(f"--lora-r must be positive integers, got {r}")
    d = dims_from_config(config)
    chosen = resolve_targets(targets)
    attention = [t for t in chosen if t in ATTENTION_TARGETS]
    mlp = [t for t in chosen if t in MLP_TARGETS]
    mlp_count = lora_param_count(d, r, mlp)
    return LoraCount(base=base_param_count(d), attention=lora_param_count(d, r, attention),
                     mlp=0 if d.moe else mlp_count, experts=mlp_count if d.moe else 0)


def load_hf_config(checkpoint: Path) -> dict:
    path = checkpoint / "config.json"
    if not path.is_file():
        raise UserError(f"--hf-checkpoint {checkpoint}: no config.json there; pass a HF checkpoint directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--hf-checkpoint {checkpoint}: config.json is not valid JSON ({exc})")


def trainable_percent(total: int, lora: int) -> float:
    return 100.0 * lora / (total + lora)


def build_report(name: str, config: dict, ranks: Sequence[int], targets: Sequence[str]) -> dict:
    """Counts for every rank, as plain data (what ``--json`` prints).  An MoE model's report
    also has ``active_params``, ``experts``, ``experts_per_token`` and, per rank,
    ``attention_lora_params`` and ``expert_lora_params``."""
    d = dims_from_config(config)
    rows = []
    for r in ranks:
        count = count_lora_params(config, r, targets)
        rows.append({"r": r, "lora_params": count.total,
                     "trainable_percent": trainable_percent(count.base, count.total)})
        if d.moe:
            rows[-1].update(attention_lora_params=count.attention, expert_lora_params=count.experts)
    report = {"model": name, "targets": resolve_targets(targets), "total_params": base_param_count(d),
              "lora": rows}
    if d.moe:
        report.update(active_params=base_param_count(d, active=True), experts=d.experts,
                      experts_per_token=d.experts_per_token)
    return report


def format_table(reports: Sequence[dict]) -> str:
    """Markdown: dense models in one table, one row per model (``Model | Total params |
    LoRA r=8 | r=16 ...``); MoE models in a second, one row per model and rank, with the
    attention and expert LoRA parameters apart."""
    dense = [report for report in reports if "experts" not in report]
    moe = [report for report in reports if "experts" in report]
    tables = ([format_dense_table(dense)] if dense else []) + ([format_moe_table(moe)] if moe else [])
    lines = ["\n\n".join(tables), "", f"LoRA targets (fused Megatron modules): {', '.join(reports[0]['targets'])}"]
    if moe:
        lines.append("MoE: linear_fc1/linear_fc2 adapt every expert (one A and B each); the router is frozen")
    return "\n".join(lines)


def format_moe_table(reports: Sequence[dict]) -> str:
    """``Model | Total params | Active params | r | Attention LoRA | Expert LoRA | LoRA total``."""
    header = ["Model (MoE)", "Total params", "Active params", "r", "Attention LoRA", "Expert LoRA", "LoRA total"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for report in reports:
        name = f"{report['model']} ({report['experts']} experts, top-{report['experts_per_token']})"
        for row in report["lora"]:
            cells = [name, f"{report['total_params']:,}", f"{report['active_params']:,}", str(row["r"]),
                     f"{row['attention_lora_params']:,}", f"{row['expert_lora_params']:,}",
                     f"{row['lora_params']:,} ({row['trainable_percent']:.2f}%)"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_dense_table(reports: Sequence[dict]) -> str:
    """``Model | Total params | LoRA r=8 | r=16 ...``, one row per model."""
    ranks = [row["r"] for row in reports[0]["lora"]]
    header = ["Model", "Total params", *(("LoRA " if i == 0 else "") + f"r={r}" for i, r in enumerate(ranks))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for report in reports:
        cells = [f"{row['lora_params']:,} ({row['trainable_percent']:.2f}%)" for row in report["lora"]]
        lines.append("| " + " | ".join([report["model"], f"{report['total_params']:,}", *cells]) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", nargs="+", help=f"one or more presets: {', '.join(PRESETS)}")
    source.add_argument("--hf-checkpoint", type=Path, help="a HF checkpoint directory (reads config.json)")
    parser.add_argument("--lora-r", type=int, nargs="+", default=[8, 16, 32], help="LoRA ranks")
    parser.add_argument("--lora-target-modules", nargs="+", default=[ALL_LINEAR],
                        help="Megatron names, HF names or all-linear (default); an HF name selects "
                        "its whole fused module (q_proj trains all of linear_qkv)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser.parse_args(argv)


def load_configs(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """``(name, config.json dict)`` for each ``--model`` preset or the ``--hf-checkpoint``."""
    if args.hf_checkpoint is not None:
        return [(args.hf_checkpoint.name, load_hf_config(args.hf_checkpoint))]
    unknown = [m for m in args.model if m not in PRESETS]
    if unknown:
        raise UserError(f"--model {', '.join(unknown)} is unknown; choose from {', '.join(PRESETS)}")
    return [(m, PRESETS[m]) for m in args.model]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    reports = [build_report(name, config, args.lora_r, args.lora_target_modules)
               for name, config in load_configs(args)]
    print(json.dumps(reports, indent=2) if args.json else format_table(reports))


if __name__ == "__main__":
    run_main(main)
