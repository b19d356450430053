"""Tiny, seeded, random Hugging Face checkpoints of the supported families, for tests.

``make_tiny_checkpoint(tmp_path, family="qwen3", num_key_value_heads=1)`` builds a
transformers model from a small config, gives *every* parameter a seeded random value
(norm weights around 1 and QKV biases non-zero, so a swapped or dropped tensor changes
the logits), and writes it with ``save_pretrained`` (safetensors) into a fresh directory
under ``tmp_path``; ``tiny_model(family, ...)`` is the same model in memory (the one factory
for tiny random test models).  ``TINY_SHAPES`` names the variants the conversion tests sweep:
GQA ratios 1, 2 and 3, ``head_dim != hidden_size / num_attention_heads``, tied and untied
embeddings.  Every variant has even head, group and vocabulary counts, so it also runs
at tensor-parallel size 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "qwen3_moe")

# transformers insists on hidden_size % num_attention_heads == 0 even when head_dim is set.
# Small enough to build in milliseconds, large enough that every dimension is split at TP=2.
BASE_CONFIG: dict = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
# Qwen3-MoE: every layer a mixture of 4 experts of width 32, top-2, as the tiny model.
MOE_CONFIG: dict = {"hidden_size": 64, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                    "moe_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 1,
                    "mlp_only_layers": []}


@dataclass(frozen=True)
class TinyShape:
    """A named checkpoint variant: a family plus config overrides."""

    name: str
    family: str
    overrides: dict = field(default_factory=dict)

    def make(self, root: str | Path, seed: int = 0) -> Path:
        return make_tiny_checkpoint(root, family=self.family, seed=seed, name=self.name, **self.overrides)


TINY_SHAPES: list[TinyShape] = [
    TinyShape("llama-gqa1-tied", "llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    TinyShape("llama-gqa3-headdim", "llama", {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
                                              "head_dim": 12}),
    TinyShape("qwen2-gqa2", "qwen2", {}),
    TinyShape("qwen2-gqa3-tied", "qwen2", {"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
                                           "tie_word_embeddings": True}),
    TinyShape("qwen3-gqa2-headdim", "qwen3", {"head_dim": 16}),
    TinyShape("qwen3-gqa1-tied", "qwen3", {"num_key_value_heads": 4, "head_dim": 12, "tie_word_embeddings": True}),
]
MOE_SHAPES: list[TinyShape] = [
    TinyShape("qwen3moe-e4-top2", "qwen3_moe", {}),
    TinyShape("qwen3moe-e8-top1-raw", "qwen3_moe", {"num_experts": 8, "num_experts_per_tok": 1, "norm_topk_prob": False,
                                                    "tie_word_embeddings": True}),
]


def tiny_config(family: str = "llama", **overrides):
    """A transformers config of ``family`` from :data:`BASE_CONFIG` plus ``overrides``."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    classes = {"llama": (LlamaConfig, "LlamaForCausalLM"), "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
               "qwen3": (Qwen3Config, "Qwen3ForCausalLM"), "qwen3_moe": (Qwen3MoeConfig, "Qwen3MoeForCausalLM")}
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    config_cls, architecture = classes[family]
    values = {**BASE_CONFIG, **(MOE_CONFIG if family == "qwen3_moe" else {}), **overrides}
    if family == "qwen2":
        values.setdefault("use_sliding_window", False)
    return config_cls(architectures=[architecture], **values)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Overwrite every parameter with seeded noise: N(0, std) for matrices and biases,
    1 + N(0, std) for norm weights (a norm left at 1 would hide a swapped q/k norm), N(0, 1) for
    MoE routers (``mlp.gate``: well-separated logits, so no top-k choice is a rounding tie)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen) * std
        if name.endswith("mlp.gate.weight"):
            noise = noise / std
        param.copy_(noise + 1.0 if "norm" in name else noise)


def tiny_model(family: str = "llama", *, seed: int = 0, randomize: bool = True, **overrides):
    """The one tiny-model factory: a seeded, random, fp32 transformers model of ``family`` in eval mode.

    The config is :func:`tiny_config` (``BASE_CONFIG`` plus ``overrides``, e.g. ``hidden_size=64``).
    ``randomize=True`` (what :func:`make_tiny_checkpoint` saves): every parameter drawn by
    :func:`randomize_` from ``seed``.  ``randomize=False``: transformers' own init after
    ``torch.manual_seed(seed)`` (matrices ~ N(0, ``initializer_range``), norms at 1), e.g. with
    ``initializer_range=0.2`` for peaked next-token distributions, so greedy decoding is far from ties.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if randomize:
        randomize_(model, seed)
    return model.eval()


def make_tiny_checkpoint(root: str | Path, family: str = "llama", *, seed: int = 0, name: str | None = None,
                         randomize: bool = True, **overrides) -> Path:
    """Build (:func:`tiny_model`) and save a tiny ``family`` model; return its directory (``root/name``).

    The weights are fp32 safetensors (``model.safetensors``); a tied model has no
    ``lm_head.weight`` in the file, as transformers saves it.
    """
    model = tiny_model(family, seed=seed, randomize=randomize, **overrides)
    out = Path(root) / (name or f"{family}-seed{seed}")
    model.save_pretrained(out, safe_serialization=True)
    return out
