"""Pipeline parallelism in the RL trainer: megatron-core's 1F1B schedule with LoRA on every stage.

One rollout's update (two clipped AdamW steps over four samples, KL against the adapters-off
reference) through the real training actor on a tiny 4-layer Qwen3 in gloo processes: PP=2 and
TP=2 x PP=2 against one process.  The loss, KL, entropy, grad norm and every adapter tensor after
the update must agree, and the exported PEFT adapter is the same whatever the layout.
"""

from __future__ import annotations

import pytest
import torch

from tests._support.dist import run_distributed
from tests._support.numerics import assert_close
from tests._support.tiny_models import make_tiny_checkpoint
from tests.backends.megatron_utils.test_actor import _init_actor, _rollout_data

LAYOUTS = {"pp1": (1, 1, 1, []),
           "pp2": (2, 1, 2, ["--pipeline-model-parallel-size", "2"]),
           "tp2-pp2": (4, 2, 2, ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                                 "--sequence-parallel"])}
RTOL = 1e-5


def _update(rank: int, checkpoint: str, flags: list[str], world_size: int) -> dict:
    from slime.backends.megatron_utils import hf_convert as hc
    from slime.backends.megatron_utils.parallel import tp_group_rank_size
    from slime_plugins.lora.lora_layer import lora_modules
    from slime_plugins.lora.peft_io import export_peft_adapter

    actor = _init_actor(checkpoint, "--use-lora", "--lora-r", "4", "--lora-alpha", "8", "--global-batch-size", "2",
                        "--check-logprob-gap", "0", "--lora-target-modules", "all-linear", *flags, rank=rank,
                        world_size=world_size)
    _, tp_rank, tp_size = tp_group_rank_size()
    with torch.no_grad():  # B != 0: every adapter is in the forward (and the reference differs) from the start
        for name, lora in lora_modules(actor.model[0]):
            full = torch.randn(lora.base_layer.output_size, lora.r,
                               generator=torch.Generator().manual_seed(sum(map(ord, lora.name)))) * 0.05
            lora.lora_B.copy_(hc.tp_shard(hc.megatron_param_kind(f"{name}.lora_B"), full, tp_rank, tp_size))
    metrics = actor.train(0, _rollout_data(actor.arch.vocab_size))
    return {"metrics": metrics, "adapter": export_peft_adapter(actor.model, actor.arch),
            "layers": [layer.layer_number for layer in actor.model[0].decoder.layers]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    # untied: megatron's tied embedding under PP syncs the two copies with a CUDA-only call
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("pp"), family="qwen3", num_hidden_layers=4, head_dim=8))


@pytest.fixture(scope="module")
def single(checkpoint) -> dict:
    world, tp, pp, flags = LAYOUTS["pp1"]
    return run_distributed(_update, world, tp=tp, pp=pp, args=(checkpoint, flags, world))[0]


@pytest.mark.numerics
@pytest.mark.parametrize("layout", ["pp2", "tp2-pp2"])
def test_pipelined_update_equals_one_process(layout, single, checkpoint):
    world, tp, pp, flags = LAYOUTS[layout]
    ranks = run_distributed(_update, world, tp=tp, pp=pp, args=(checkpoint, flags, world), timeout=600)
    assert sorted({tuple(r["layers"]) for r in ranks}) == [(1, 2), (3, 4)]  # each stage its own layers
    assert single["metrics"]["train/kl"] > 0 and single["metrics"]["train/steps"] == 2
    for name in ("train/loss", "train/kl", "train/entropy", "train/grad_norm", "train/clipfrac"):
        for rank, result in enumerate(ranks):
            assert_close(result["metrics"][name], single["metrics"][name], rtol=RTOL, atol=1e-7,
                         what=f"{layout} rank {rank} {name}")
    for rank, result in enumerate(ranks):
        assert result["adapter"].keys() == single["adapter"].keys()
        for key, expected in single["adapter"].items():
            assert_close(result["adapter"][key], expected, rtol=0, atol=1e-6, what=f"{layout} rank {rank} {key}")
