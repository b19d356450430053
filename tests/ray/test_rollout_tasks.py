"""The rollout side of ``--lora-tasks``: every task's requests go to the engines in one call per
engine, each naming its task's adapter; each task is scored by its own reward, reported under its
own metric keys, and resumed at its own data position."""

from __future__ import annotations

import json
import sys

import pytest
import ray
import torch

from slime.ray.cluster import create_placement_group, ray_cluster
from slime.ray.rollout import RolloutManager
from slime.rollout import engines
from slime.rollout.hf_engine import HFRolloutEngine, _read_peft_dir
from slime.utils.arguments import parse_args
from tests._support.adapters import peft_adapter_with_random_b
from tests._support.logprobs import peft_logprobs
from tests._support.tiny_rl import make_tiny_rl_checkpoint, write_prompts

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
BATCH, N, MAX_LEN = 2, 2, 6


class RecordingEngine(HFRolloutEngine):
    """The built-in engine, remembering the adapter names of every generate call it gets."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[list] = []

    def generate(self, prompt_token_ids, params, lora_names=None):
        names = [lora_names] * len(prompt_token_ids) if lora_names is None or isinstance(lora_names, str) \
            else list(lora_names)
        self.calls.append(names)
        return super().generate(prompt_token_ids, params, lora_names)

    def take_calls(self) -> list[list]:
        calls, self.calls = self.calls, []
        return calls


REWARDS = '''
def one(args, sample):
    return 1.0


def length(args, sample):
    return float(len(sample.response_token_ids))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    ckpt = make_tiny_rl_checkpoint(root / "ckpt")
    adapters = {name: root / f"adapter_{name}" for name in ("add", "mul")}
    for seed, (name, path) in enumerate(adapters.items()):
        peft_adapter_with_random_b(ckpt, path, seed=seed + 1, b_std=0.5)
    (root / "task_rewards.py").write_text(REWARDS)
    tasks = [{"name": name, "prompt_data": str(write_prompts(root / f"{name}.jsonl", n=6, seed=k)),
              "eval_prompt_data": {"e": str(write_prompts(root / f"{name}_eval.jsonl", n=2, seed=10 + k))},
              "custom_rm_path": f"{root / 'task_rewards.py'}:{fn}", "r": 4}
             for k, (name, fn) in enumerate((("add", "one"), ("mul", "length")))]
    (root / "tasks.json").write_text(json.dumps(tasks))
    args = parse_args(["--hf-checkpoint", str(ckpt), "--lora-tasks", str(root / "tasks.json"), "--use-lora",
                       "--lora-r", "4", "--apply-chat-template", "--rollout-batch-size", str(BATCH),
                       "--n-samples-per-prompt", str(N), "--global-batch-size", str(BATCH * N),
                       "--rollout-max-response-len", str(MAX_LEN), "--eval-max-response-len", str(MAX_LEN),
                       "--rollout-num-engines", "2", "--rollout-num-threads", "1", "--seed", "3"])
    return args, ckpt, adapters


@pytest.fixture(scope="module")
def manager(setup):
    args, _, adapters = setup
    saved = engines.ENGINES["hf"]
    engines.ENGINES["hf"] = f"{__name__}:{RecordingEngine.__name__}"
    try:
        with ray_cluster(num_cpus=2):
            group = create_placement_group(2, use_gpu=False)
            rollout = RolloutManager(args, group, range(0, 2))
            for name, path in adapters.items():
                synced = rollout.update_weights(ray.put(_read_peft_dir(str(path))), name)
                assert synced["sync/tensors"] > 0
            yield rollout
            rollout.engines.kill()
    finally:
        engines.ENGINES["hf"] = saved


def test_every_task_goes_out_in_one_call_per_engine_under_its_adapter(manager, setup):
    _, ckpt, adapters = setup
    manager.engines.call("take_calls")
    batch, metrics = manager.generate(0)
    per_task = BATCH * N
    assert batch.tasks == ["add"] * per_task + ["mul"] * per_task
    assert batch.group_ids == sorted(batch.group_ids) and len(set(batch.group_ids)) == 2 * BATCH
    calls = manager.engines.call("take_calls")
    assert [len(c) for c in calls] == [1, 1]  # one generate call per engine
    assert [name for c in calls for name in c[0]] == batch.tasks  # each request under its task's adapter

    # Each sample's log-probs are its own adapter's (and not the other task's).
    for i, task in enumerate(batch.tasks):
        tokens = torch.tensor([batch.tokens[i]])
        start = batch.prompt_lens[i]
        other = "mul" if task == "add" else "add"
        mine = peft_logprobs(ckpt, adapters[task], tokens)[0, start - 1:]
        theirs = peft_logprobs(ckpt, adapters[other], tokens)[0, start - 1:]
        got = torch.tensor(batch.rollout_logprobs[i])
        assert torch.allclose(got, mine, atol=1e-4), (task, got, mine)
        assert (got - theirs).abs().max() > 1e-2

    # Each task scored by its own reward, reported under its own keys.
    lengths = [len(batch.response(i)) for i in range(len(batch))]
    assert metrics["add/rollout/reward_mean"] == 1.0
    assert metrics["mul/rollout/reward_mean"] == pytest.approx(sum(lengths[per_task:]) / per_task)
    assert metrics["mul/rollout/response_len_mean"] == metrics["mul/rollout/reward_mean"]
    assert metrics["add/rollout/zero_std_groups"] == 1.0  # a constant reward: no signal
    assert metrics["rollout/reward_mean"] == pytest.approx((1.0 + metrics["mul/rollout/reward_mean"]) / 2)
    for key in ("rollout/truncated", "rollout/epoch", "rollout/response_len_mean"):
        assert f"add/{key}" in metrics and f"mul/{key}" in metrics
    assert batch.advantages[:per_task] == [0.0] * per_task  # advantages per prompt group


def test_eval_sets_of_every_task_in_one_call_per_engine(manager):
    manager.engines.call("take_calls")
    metrics = manager.eval(0)
    calls = manager.engines.call("take_calls")
    assert sum(len(c) for c in calls) <= 2 and all(len(c) <= 1 for c in calls)
    names = [name for c in calls for call in c for name in call]
    assert names == ["add"] * 2 + ["mul"] * 2  # one sample per eval prompt, two prompts per task
    assert metrics["add/eval/e/reward_mean"] == 1.0
    assert metrics["mul/eval/e/reward_mean"] == metrics["mul/eval/e/response_len_mean"]


def test_resume_draws_the_same_rollout_for_every_task(manager):
    state = json.loads(json.dumps(manager.state_dict()))  # as a checkpoint stores it
    assert sorted(state["tasks"]) == ["add", "mul"]
    first, _ = manager.generate(1)
    manager.load_state_dict(state)
    again, _ = manager.generate(1)
    assert (again.tokens, again.rollout_logprobs, again.tasks) == (first.tokens, first.rollout_logprobs, first.tasks)
    assert manager.num_rollout_per_epoch() == 6 // BATCH
