"""The rollout side of the RL loop: prompts in, scored samples out.

:class:`RolloutManager` (driver side) owns the prompt data, the reward function and a handle
on the rollout engine, a Ray actor (:class:`RolloutEngineActor`) in its own bundle.  The
trainer's weight updates reach the engine as an ``ObjectRef`` straight from the training
actor, without passing through the driver: with LoRA, only the adapter tensors.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import time

import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from slime.ray.actor_group import get_all
from slime.rollout.batch import group_advantages
from slime.rollout.data import PromptDataset, Sample
from slime.rollout.engine import SamplingParams
from slime.rollout.hf_engine import HFRolloutEngine
from slime.rollout.rm import batch_rewards, load_reward_fn
from slime.utils.allocator import allocator_env

POLICY_ADAPTER = "policy"


class RolloutEngineActor(HFRolloutEngine):
    """The built-in engine plus the one call weight sync needs."""

    def apply_update(self, payload: tuple[dict[str, torch.Tensor], dict | None]) -> dict:
        """Switch to the trainer's newest weights: an adapter (``config`` given) or full weights."""
        start = time.time()
        tensors, config = payload
        if config is not None:
            self.load_lora_adapter(POLICY_ADAPTER, tensors=tensors, config=config)
        else:
            self.update_weights(tensors)
        return {"sync/bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                "sync/tensors": len(tensors), "sync/engine_seconds": time.time() - start}

    def pid(self) -> int:
        return os.getpid()


class RolloutManager:
    """Generates and scores one rollout at a time; evaluates the held-out sets."""

    def __init__(self, args: argparse.Namespace, group: PlacementGroup, bundle_index: int) -> None:
        from transformers import AutoTokenizer

        self.args = args
        self.tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
        self.reward_fn = load_reward_fn(args)  # a bad --custom-rm-path fails before any training
        self.dataset = PromptDataset.from_args(args, self.tokenizer) if args.prompt_data else None
        self.eval_sets = {}
        pairs = args.eval_prompt_data or []
        for name, path in zip(pairs[::2], pairs[1::2]):
            self.eval_sets[name] = PromptDataset.from_args(args, self.tokenizer, path=path, shuffle=False,
                                                           flag="--eval-prompt-data")
        threads = args.rollout_num_threads or os.cpu_count()
        self.engine = ray.remote(num_cpus=1, num_gpus=1 if torch.cuda.is_available() else 0)(RolloutEngineActor).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group,
                                                                 placement_group_bundle_index=bundle_index),
            runtime_env={"env_vars": allocator_env(args.allocator)},
        ).remote(args.hf_checkpoint, torch.bfloat16 if args.bf16 else torch.float32, threads,
                 merge_adapters=args.rollout_merge_lora)
        self.engine_pid = get_all([self.engine.pid.remote()])[0]
        self.adapter = POLICY_ADAPTER if args.use_lora else None

    # ------------------------------------------------------------------ weights

    def update_weights(self, payload_ref: ray.ObjectRef) -> dict:
        """Hand the engine the trainer's export (an ObjectRef resolved inside the engine actor)."""
        return get_all([self.engine.apply_update.remote(payload_ref)])[0]

    # ------------------------------------------------------------------ rollout

    def num_rollout_per_epoch(self) -> int:
        return max(1, len(self.dataset) // self.args.rollout_batch_size) if self.dataset else 0

    def _generate(self, samples: list[Sample], params: SamplingParams) -> list[Sample]:
        outputs = get_all([self.engine.generate.remote([s.prompt_token_ids for s in samples], params, self.adapter)])[0]
        for sample, out in zip(samples, outputs):
            sample.response_token_ids = out.token_ids
            sample.rollout_logprobs = out.logprobs
            sample.response = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        rewards = asyncio.run(batch_rewards(self.args, samples))
        for sample, reward in zip(samples, rewards):
            sample.reward = reward
        return samples

    def generate(self, rollout_id: int) -> tuple[dict, dict]:
        """Sample ``--rollout-batch-size`` prompts x ``--n-samples-per-prompt``; score; advantages.

        Returns the training data (see ``MegatronTrainRayActor.train``) and rollout metrics.
        """
        args = self.args
        start = time.time()
        prompts = self.dataset.next_batch(args.rollout_batch_size)
        samples = []
        for group_index, prompt in enumerate(prompts):
            for _ in range(args.n_samples_per_prompt):
                sample = copy.copy(prompt)
                sample.group_index = group_index
                samples.append(sample)
        params = SamplingParams(max_new_tokens=args.rollout_max_response_len, temperature=args.rollout_temperature,
                                top_p=args.rollout_top_p, top_k=args.rollout_top_k, seed=args.seed * 100003 + rollout_id)
        samples = self._generate(samples, params)
        seconds = time.time() - start
        rewards = [s.reward for s in samples]
        advantages = group_advantages(rewards, args.n_samples_per_prompt, args.advantage_estimator).tolist()
        lengths = [len(s.response_token_ids) for s in samples]
        data = {
            "tokens": [s.prompt_token_ids + s.response_token_ids for s in samples],
            "prompt_lens": [len(s.prompt_token_ids) for s in samples],
            "rollout_logprobs": [s.rollout_logprobs for s in samples],
            "advantages": advantages,
        }
        groups = torch.tensor(rewards).view(-1, args.n_samples_per_prompt)
        metrics = {
            "rollout/reward_mean": sum(rewards) / len(rewards),
            "rollout/response_len_mean": sum(lengths) / len(lengths),
            "rollout/tokens_per_second": sum(lengths) / max(seconds, 1e-9),
            "rollout/zero_std_groups": float((groups.std(dim=1) == 0).float().mean()) if groups.shape[1] > 1 else 1.0,
            "rollout/truncated": sum(len(s.response_token_ids) >= args.rollout_max_response_len for s in samples) / len(samples),
            "rollout/epoch": self.dataset.epoch,
            "perf/rollout_seconds": seconds,
        }
        self.last_samples = samples
        return data, metrics

    def eval(self, rollout_id: int) -> dict:
        """Reward mean per held-out set (greedy with --eval-temperature 0)."""
        args = self.args
        metrics = {}
        for name, dataset in self.eval_sets.items():
            start = time.time()
            samples = [copy.copy(s) for s in dataset.samples() for _ in range(args.n_samples_per_eval_prompt)]
            params = SamplingParams(max_new_tokens=args.eval_max_response_len, temperature=args.eval_temperature,
                                    seed=args.seed + 7)
            samples = self._generate(samples, params)
            metrics[f"eval/{name}/reward_mean"] = sum(s.reward for s in samples) / len(samples)
            metrics[f"eval/{name}/response_len_mean"] = sum(len(s.response_token_ids) for s in samples) / len(samples)
            metrics[f"perf/eval_{name}_seconds"] = time.time() - start
        return metrics

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        return {"dataset": self.dataset.state_dict()} if self.dataset else {}

    def load_state_dict(self, state: dict) -> None:
        if self.dataset and "dataset" in state:
            self.dataset.load_state_dict(state["dataset"])

