"""Several adapters on one base (``--lora-tasks``): each task's adapter trains exactly as it would
alone.  Two tasks with different rank, alpha and learning rate share one model; after two
rollouts (two AdamW steps each) every adapter equals, to 1e-6 in fp32, the adapter of a one-task
run on that task's samples with the same seed.  TP=1 and TP=2."""

import json

import pytest
import torch

from slime.rollout.batch import RolloutBatch
from tests._support.dist import run_distributed
from tests.backends.megatron_utils.test_actor import _init_actor, _rollout_data

TASKS = [{"name": "add", "prompt_data": "unused.jsonl", "lr": 1e-3, "r": 4},
         {"name": "sub", "prompt_data": "unused.jsonl", "lr": 3e-3, "r": 8, "lora_alpha": 8}]
ATOL = 1e-6


def _adapters(actor, name: str) -> dict[str, torch.Tensor]:
    from slime_plugins.lora.lora_layer import lora_modules

    out = {}
    for module_name, layer in lora_modules(actor.model[0]):
        weights = layer.adapters[name]
        out[f"{module_name}.lora_A"] = weights.lora_A.detach().clone()
        out[f"{module_name}.lora_B"] = weights.lora_B.detach().clone()
    return out


def _joint(first: RolloutBatch, second: RolloutBatch) -> RolloutBatch:
    """One rollout of both tasks: ``add``'s samples, then ``sub``'s, group ids continuing."""
    offset = max(first.group_ids) + 1
    return RolloutBatch(first.tokens + second.tokens, first.prompt_lens + second.prompt_lens,
                        first.rollout_logprobs + second.rollout_logprobs, first.advantages + second.advantages,
                        first.group_ids + [g + offset for g in second.group_ids],
                        tasks=["add"] * len(first) + ["sub"] * len(second))


def _train_both_ways(rank, checkpoint, task_file, tp):
    common = ["--use-lora", "--seed", "7", "--check-logprob-gap", "0", "--tensor-model-parallel-size", str(tp)]
    multi = _init_actor(checkpoint, *common, "--lora-tasks", task_file, rank=rank, world_size=tp)
    vocab = multi.arch.vocab_size
    rollouts = [(_rollout_data(vocab, seed=2 * i), _rollout_data(vocab, seed=2 * i + 1)) for i in range(2)]
    assert all(torch.count_nonzero(t) == 0 for k, t in _adapters(multi, "sub").items() if k.endswith("lora_B"))
    multi_metrics = [multi.train(i, _joint(add, sub)) for i, (add, sub) in enumerate(rollouts)]
    trained = {name: _adapters(multi, name) for name in ("add", "sub")}
    del multi
    out = {"multi_metrics": multi_metrics, "max_diff": {}, "solo_metrics": {}}
    for index, task in enumerate(TASKS):
        flags = ["--lr", str(task["lr"]), "--lora-r", str(task["r"]), "--lora-alpha", str(task.get("lora_alpha", 16))]
        solo = _init_actor(checkpoint, *common, *flags, rank=rank, world_size=tp)
        out["solo_metrics"][task["name"]] = [solo.train(i, pair[index]) for i, pair in enumerate(rollouts)]
        alone = _adapters(solo, "default")
        assert alone.keys() == trained[task["name"]].keys()
        out["max_diff"][task["name"]] = max(float((alone[k] - trained[task["name"]][k]).abs().max()) for k in alone)
        out.setdefault("moved", {})[task["name"]] = any(torch.count_nonzero(v) for k, v in alone.items()
                                                        if k.endswith("lora_B"))
        del solo
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_each_adapter_trains_as_it_would_alone(tmp_path, tp):
    from tests._support.tiny_models import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "model")
    task_file = tmp_path / "tasks.json"
    task_file.write_text(json.dumps({"tasks": TASKS}))
    for out in run_distributed(_train_both_ways, tp, args=(str(checkpoint), str(task_file), tp), timeout=600):
        assert out["moved"] == {"add": True, "sub": True}  # the comparison is not of two untouched adapters
        assert max(out["max_diff"].values()) <= ATOL, out["max_diff"]
        for step, metrics in enumerate(out["multi_metrics"]):
            for task in ("add", "sub"):
                solo = out["solo_metrics"][task][step]
                assert metrics[f"{task}/train/steps"] == 1
                assert metrics[f"{task}/train/lr"] == solo["train/lr"] == dict(
                    (t["name"], t["lr"]) for t in TASKS)[task]
                torch.testing.assert_close(metrics[f"{task}/train/loss"], solo["train/loss"], atol=ATOL, rtol=0)
                torch.testing.assert_close(metrics[f"{task}/train/grad_norm"], solo["train/grad_norm"],
                                           atol=0, rtol=1e-5)
                torch.testing.assert_close(metrics[f"{task}/train/kl"], solo["train/kl"], atol=ATOL, rtol=0)
