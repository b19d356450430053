"""Mixture-of-experts (Qwen3-MoE) in megatron-core against transformers: logits, export, layouts.

Tiny random Qwen3-MoE checkpoints (4 experts top-2 with renormalised weights; 8 experts top-1
raw softmax, tied embeddings) built by transformers, loaded into our megatron-core model
(megatron's MoE layer, experts in a loop, allgather token dispatcher), compared with
transformers' own forward; the same at expert parallelism 2 and tensor parallelism 2 in real
gloo processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slime.backends.megatron_utils import hf_convert as hc
from slime.backends.megatron_utils.arch import ModelArch
from slime.utils.errors import UserError
from tests._support.dist import run_distributed
from tests._support.numerics import assert_close
from tests._support.tiny_models import MOE_SHAPES, make_tiny_checkpoint
from tests.backends.megatron_utils.test_hf_convert import _build, _hf_logits, _megatron_logits, _round_trip_mismatches


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-moe")
    return {shape.name: shape.make(root) for shape in MOE_SHAPES}


# ----------------------------------------------------------------------------- config


def test_arch_reads_both_expert_count_spellings():
    config = json.loads(json.dumps({"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2, "hidden_size": 8,
                                    "intermediate_size": 16, "num_attention_heads": 2, "vocab_size": 10,
                                    "moe_intermediate_size": 4, "num_experts_per_tok": 2, "norm_topk_prob": True}))
    hub = ModelArch.from_hf_config({**config, "num_experts": 6})
    saved = ModelArch.from_hf_config({**config, "num_local_experts": 6})
    assert hub == saved and hub.is_moe and (hub.num_experts, hub.moe_topk, hub.moe_ffn_hidden_size) == (6, 2, 4)
    shapes = hub.linear_shapes()
    assert shapes["decoder.layers.1.mlp.experts.local_experts.5.linear_fc1"] == (8, 8)
    assert shapes["decoder.layers.0.mlp.experts.local_experts.0.linear_fc2"] == (8, 4)
    assert not any(name.endswith("mlp.linear_fc1") for name in shapes)  # no dense MLP in an MoE layer


@pytest.mark.parametrize("extra,match", [({"decoder_sparse_step": 2}, "decoder_sparse_step"),
                                         ({"mlp_only_layers": [0]}, "mlp_only_layers"),
                                         ({"shared_expert_intermediate_size": 8}, "shared experts")])
def test_unsupported_moe_variants_are_named(extra, match):
    config = {"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2, "hidden_size": 8,
              "intermediate_size": 16, "num_attention_heads": 2, "vocab_size": 10, "num_experts": 4,
              "moe_intermediate_size": 4, "num_experts_per_tok": 2, **extra}
    with pytest.raises(UserError, match=f"config.json: Qwen3-MoE with .*{match}.*not supported"):
        ModelArch.from_hf_config(config)


def test_expert_layout_errors_name_the_flag():
    arch = ModelArch.from_hf_config({"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2,
                                     "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
                                     "vocab_size": 10, "num_experts": 6, "moe_intermediate_size": 4,
                                     "num_experts_per_tok": 2})
    errors = arch.moe_errors(tp_size=2, ep_size=4, etp_size=2, sequence_parallel=False, dispatcher="alltoall",
                             on_gpu=False)
    assert len(errors) == 4
    assert "--expert-model-parallel-size 4 does not divide the model's 6 experts" in errors[0]
    assert "--expert-tensor-parallel-size 2" in errors[1] and "--sequence-parallel" in errors[2]
    assert "alltoall needs CUDA" in errors[3]
    assert arch.moe_errors(tp_size=2, ep_size=2, etp_size=1, sequence_parallel=True, dispatcher="allgather",
                           on_gpu=False) == []


def test_name_tables_map_experts_by_global_index():
    assert hc.hf_names(3, "mlp.experts.local_experts.5.linear_fc1", "weight") == (
        "model.layers.3.mlp.experts.5.gate_proj.weight", "model.layers.3.mlp.experts.5.up_proj.weight")
    assert hc.hf_names(0, "mlp.experts.local_experts.0.linear_fc2", "lora_B") == (
        "model.layers.0.mlp.experts.0.down_proj.lora_B",)
    assert hc.hf_names(1, "mlp.router", "weight") == ("model.layers.1.mlp.gate.weight",)
    assert hc.global_module("mlp.experts.local_experts.1.linear_fc2", 4) == "mlp.experts.local_experts.5.linear_fc2"
    # whole experts on every rank: nothing of an expert is split over TP
    for param in ("weight", "lora_A", "lora_B"):
        assert hc.megatron_param_kind(f"decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.{param}") == hc.REPLICATED
    assert hc.megatron_param_kind("decoder.layers.0.mlp.router.weight") == hc.REPLICATED


# ----------------------------------------------------------------------------- one process


@pytest.mark.numerics
@pytest.mark.parametrize("shape", [s.name for s in MOE_SHAPES])
def test_moe_logits_match_transformers_and_export_round_trips(shape, moe_checkpoints, single_process):
    chunks, arch = _build(moe_checkpoints[shape])
    assert arch.is_moe and len(chunks[0].decoder.layers[0].mlp.experts.local_experts) == arch.num_experts
    expected = _hf_logits(moe_checkpoints[shape])
    assert_close(_megatron_logits(chunks, arch), expected, atol=1e-5, rtol=0,
                 what=f"{shape}: megatron MoE vs transformers logits (fp32)")
    assert _round_trip_mismatches(hc.export_hf_weights(chunks, arch), moe_checkpoints[shape]) == []


@pytest.mark.numerics
def test_moe_checkpoint_of_another_expert_width_is_named(tmp_path, single_process):
    path = make_tiny_checkpoint(tmp_path, family="qwen3_moe", name="a")
    other = make_tiny_checkpoint(tmp_path, family="qwen3_moe", name="b", moe_intermediate_size=16)
    (path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match=r"tensor model\.layers\.0\.mlp\.experts\.0\.\w+_proj\.weight has shape"):
        _build(path)


# ----------------------------------------------------------------------------- EP=2 and TP=2


def _layout_worker(rank: int, path: str, tp: int, flags: list[str], reference: torch.Tensor) -> tuple[list[str], list[int]]:
    chunks, arch = _build(Path(path), tp, *flags)
    assert_close(_megatron_logits(chunks, arch), reference, atol=1e-5, rtol=0, what=f"{flags}: megatron vs transformers")
    local = chunks[0].decoder.layers[0].mlp.local_expert_indices
    return _round_trip_mismatches(hc.export_hf_weights(chunks, arch), Path(path)), list(local)


@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["ep2", "tp2-sp"])
def test_moe_parallel_layouts_match_transformers(layout, moe_checkpoints):
    path = moe_checkpoints["qwen3moe-e4-top2"]
    flags = {"ep2": ["--expert-model-parallel-size", "2", "--actor-num-gpus-per-node", "2"],
             "tp2-sp": ["--sequence-parallel"]}[layout]
    tp, ep = (1, 2) if layout == "ep2" else (2, 1)
    results = run_distributed(_layout_worker, 2, tp=tp, ep=ep, args=(str(path), tp, flags, _hf_logits(path)))
    assert [mismatches for mismatches, _ in results] == [[], []]
    experts = [local for _, local in results]
    assert experts == ([[0, 1], [2, 3]] if ep == 2 else [[0, 1, 2, 3]] * 2)
