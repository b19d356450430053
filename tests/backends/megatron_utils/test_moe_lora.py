"""LoRA on a mixture-of-experts model: per-expert adapters, a frozen router, exact under EP and TP.

One rollout's update (one clipped AdamW step over four samples) through the real training
actor on a tiny Qwen3-MoE, at one process, at expert parallelism 2 (two data-parallel ranks,
two experts each) and at tensor parallelism 2 with sequence parallelism, in gloo processes.
The loss, KL, entropy, grad norm and every adapter tensor after the step must agree.
"""

from __future__ import annotations

import pytest
import torch

from tests._support.dist import run_distributed
from tests._support.numerics import assert_close
from tests._support.tiny_models import make_tiny_checkpoint
from tests.backends.megatron_utils.test_actor import _init_actor, _rollout_data

LAYOUTS = {"ep1": (1, 1, 1, []),
           "ep2": (2, 1, 2, ["--expert-model-parallel-size", "2", "--actor-num-gpus-per-node", "2"]),
           "tp2-sp": (2, 2, 1, ["--tensor-model-parallel-size", "2", "--sequence-parallel"])}
TARGETS = ["--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
RTOL = 1e-5


def _update(rank: int, checkpoint: str, flags: list[str], world_size: int) -> dict:
    from slime.backends.megatron_utils import hf_convert as hc
    from slime.backends.megatron_utils.parallel import tp_group_rank_size
    from slime_plugins.lora.lora_layer import lora_modules
    from slime_plugins.lora.peft_io import export_peft_adapter

    actor = _init_actor(checkpoint, "--use-lora", "--lora-r", "4", "--lora-alpha", "8", *TARGETS, "--global-batch-size",
                        "4", "--check-logprob-gap", "0", *flags, rank=rank, world_size=world_size)
    model = actor.model[0]
    wrapped = [name for name, _ in lora_modules(model)]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    _, tp_rank, tp_size = tp_group_rank_size()
    with torch.no_grad():  # B != 0 so every expert's adapter is in the forward from the start
        for name, lora in lora_modules(model):
            # one global B per module, seeded by its whole-model name, then this rank's shard
            full = torch.randn(lora.base_layer.output_size, lora.r,
                               generator=torch.Generator().manual_seed(sum(map(ord, lora.name)))) * 0.05
            lora.lora_B.copy_(hc.tp_shard(hc.megatron_param_kind(f"{name}.lora_B"), full, tp_rank, tp_size))
    start = export_peft_adapter(actor.model, actor.arch)
    metrics = actor.train(0, _rollout_data(actor.arch.vocab_size))
    return {"metrics": metrics, "adapter": export_peft_adapter(actor.model, actor.arch), "wrapped": wrapped,
            "trainable": trainable, "start": start}


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("moe-lora"), family="qwen3_moe"))


@pytest.fixture(scope="module")
def single(moe_checkpoint) -> dict:
    world, tp, ep, flags = LAYOUTS["ep1"]
    return run_distributed(_update, world, tp=tp, ep=ep, args=(moe_checkpoint, flags, world))[0]


def test_adapters_on_every_expert_and_the_router_frozen(single):
    wrapped = single["wrapped"]
    experts = [n for n in wrapped if ".local_experts." in n]
    assert len(experts) == 2 * 4 * 2  # layers x experts x (fc1, fc2)
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2" in experts
    assert not any("router" in n for n in single["trainable"])
    assert all(n.endswith(("lora_A", "lora_B")) for n in single["trainable"])
    keys = single["adapter"]
    assert "base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight" in keys
    assert keys["base_model.model.model.layers.0.mlp.experts.2.gate_proj.lora_A.weight"].shape == (4, 64)
    assert keys["base_model.model.model.layers.0.mlp.experts.2.up_proj.lora_B.weight"].shape == (32, 4)


def test_the_step_changed_the_expert_adapters(single):
    assert single["metrics"]["train/grad_norm"] > 0
    start = single["start"]
    moved = {k for k, v in single["adapter"].items() if not torch.equal(v, start[k])}
    expert_a = {k for k in start if ".experts." in k and "lora_A" in k}
    # an expert no token of the batch was routed to gets no gradient; most get some
    assert len(expert_a & moved) >= len(expert_a) * 3 // 4, sorted(expert_a - moved)
    assert {k for k in start if "self_attn" in k and "lora_A" in k} <= moved


@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["ep2", "tp2-sp"])
def test_parallel_update_equals_one_process(layout, single, moe_checkpoint):
    world, tp, ep, flags = LAYOUTS[layout]
    ranks = run_distributed(_update, world, tp=tp, ep=ep, args=(moe_checkpoint, flags, world))
    for name in ("train/loss", "train/kl", "train/entropy", "train/grad_norm"):
        expected = single["metrics"][name]
        for rank, result in enumerate(ranks):
            assert_close(result["metrics"][name], expected, rtol=RTOL, atol=1e-7, what=f"{layout} rank {rank} {name}")
    for rank, result in enumerate(ranks):
        assert result["adapter"].keys() == single["adapter"].keys()
        for key, expected in single["adapter"].items():
            assert_close(result["adapter"][key], expected, rtol=0, atol=1e-6, what=f"{layout} rank {rank} {key}")
