"""The rollout side of the RL loop: prompts in, scored samples out.

:class:`RolloutManager` (driver side) owns the prompt data, the reward function and the
rollout engines: ``--rollout-num-engines`` Ray actors running the ``--rollout-engine``
implementation (:mod:`slime.rollout.engines`), each in its own bundle.  A rollout's prompt
groups are split among the engines in contiguous shares, so every group stays on one engine.
The trainer's weight updates reach the engines as an ``ObjectRef`` straight from the
training actor, without passing through the driver: with LoRA, only the adapter tensors.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import time

import ray
import torch
from ray.util.placement_group import PlacementGroup

from slime.backends.megatron_utils.arch import ModelArch
from slime.ray.actor_group import RayActorGroup
from slime.rollout.batch import RolloutBatch, group_advantages, repeat_prompts
from slime.rollout.data import PromptDataset, Sample
from slime.rollout.engine import POLICY_ADAPTER, SamplingParams
from slime.rollout.engines import engine_class, engine_kwargs
from slime.rollout.rm import batch_rewards, load_reward_fn
from slime.utils.allocator import allocator_env


class RolloutManager:
    """Generates and scores one rollout at a time; evaluates the held-out sets."""

    def __init__(self, args: argparse.Namespace, group: PlacementGroup, bundles: range) -> None:
        from transformers import AutoTokenizer

        self.args = args
        self.tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
        load_reward_fn(args)  # resolved (and cached) now: a bad --custom-rm-path fails before any training
        # The datasets preflight built and validated: same files, tokenizer and prompt limits.
        positions = ModelArch.from_checkpoint(args.hf_checkpoint).max_position_embeddings
        self.dataset = (PromptDataset.from_args(args, self.tokenizer, max_positions=positions)
                        if args.prompt_data else None)
        self.eval_sets = {}
        pairs = args.eval_prompt_data or []
        for name, path in zip(pairs[::2], pairs[1::2]):
            self.eval_sets[name] = PromptDataset.from_args(args, self.tokenizer, path=path, eval_set=True,
                                                           max_positions=positions)
        # Independent actors (no torch.distributed world), each running the chosen engine class.
        self.engines = RayActorGroup(engine_class(args.rollout_engine), len(bundles), group,
                                     use_gpu=torch.cuda.is_available(), kwargs=engine_kwargs(args),
                                     first_bundle=bundles.start, env_vars=allocator_env(args.allocator),
                                     distributed=False, name="the rollout engine", timeout_s=args.actor_timeout)
        self.engine_pids: list[int] = self.engines.call("pid")
        self.engines.pids = self.engine_pids  # failure reports name the process
        self.adapter = POLICY_ADAPTER if args.use_lora else None

    # ------------------------------------------------------------------ weights

    def update_weights(self, payload_ref: ray.ObjectRef) -> dict:
        """Hand every engine the trainer's export (an ObjectRef resolved inside each engine actor).

        ``sync/bytes`` and ``sync/tensors`` add up over the engines; ``sync/engine_seconds`` is the slowest."""
        results = self.engines.call("apply_update", payload_ref)
        metrics = dict(results[0])
        for key in ("sync/bytes", "sync/tensors"):
            metrics[key] = sum(r[key] for r in results)
        metrics["sync/engine_seconds"] = max(r["sync/engine_seconds"] for r in results)
        return metrics

    # ------------------------------------------------------------------ rollout

    def num_rollout_per_epoch(self) -> int:
        return max(1, len(self.dataset) // self.args.rollout_batch_size) if self.dataset else 0

    def _generate(self, samples: list[Sample], params: SamplingParams, group_size: int) -> list[Sample]:
        prompts = [s.prompt_token_ids for s in samples]
        shares = engine_shares(len(samples), group_size, len(self.engines))
        calls = [(prompts[share], params, self.adapter) for share in shares]
        outputs = [out for part in self.engines.call_each("generate", calls) for out in part]
        for sample, out in zip(samples, outputs):
            sample.response_token_ids = out.token_ids
            sample.rollout_logprobs = out.logprobs
            sample.response = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        rewards = asyncio.run(batch_rewards(self.args, samples))
        for sample, reward in zip(samples, rewards):
            sample.reward = reward
        return samples

    def generate(self, rollout_id: int) -> tuple[RolloutBatch, dict]:
        """Sample ``--rollout-batch-size`` prompts x ``--n-samples-per-prompt``; score; advantages.

        Returns the :class:`RolloutBatch` to train on and the rollout metrics.
        """
        args = self.args
        start = time.time()
        samples = repeat_prompts(self.dataset.next_batch(args.rollout_batch_size), args.n_samples_per_prompt)
        params = SamplingParams(max_new_tokens=args.rollout_max_response_len, temperature=args.rollout_temperature,
                                top_p=args.rollout_top_p, top_k=args.rollout_top_k, seed=args.seed * 100003 + rollout_id)
        samples = self._generate(samples, params, args.n_samples_per_prompt)
        seconds = time.time() - start
        rewards = [s.reward for s in samples]
        advantages = group_advantages(rewards, args.n_samples_per_prompt, args.advantage_estimator).tolist()
        lengths = [len(s.response_token_ids) for s in samples]
        batch = RolloutBatch.from_samples(samples, advantages)
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
        return batch, metrics

    def eval(self, rollout_id: int) -> dict:
        """Reward mean per held-out set (greedy with --eval-temperature 0)."""
        args = self.args
        metrics = {}
        for name, dataset in self.eval_sets.items():
            start = time.time()
            samples = [copy.copy(s) for s in dataset.samples() for _ in range(args.n_samples_per_eval_prompt)]
            params = SamplingParams(max_new_tokens=args.eval_max_response_len, temperature=args.eval_temperature,
                                    seed=args.seed + 7)
            samples = self._generate(samples, params, args.n_samples_per_eval_prompt)
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



def engine_shares(num_rows: int, group_size: int, num_engines: int) -> list[slice]:
    """Contiguous row ranges, one per engine that gets work, each a whole number of groups of
    ``group_size`` rows, as even as possible (the first engines take one group more)."""
    groups = -(-num_rows // group_size)
    per, extra = divmod(groups, num_engines)
    shares, start = [], 0
    for i in range(num_engines):
        stop = min(num_rows, start + (per + (i < extra)) * group_size)
        if stop > start:
            shares.append(slice(start, stop))
        start = stop
    return shares
