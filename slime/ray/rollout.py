"""The rollout side of the RL loop: prompts in, scored samples out.

:class:`RolloutManager` (driver side) owns the prompt data, the reward function and the
rollout engines: ``--rollout-num-engines`` Ray actors running the ``--rollout-engine``
implementation (:mod:`slime.rollout.engines`), each in its own bundle.  A rollout's prompt
groups are split among the engines in contiguous shares, so every group stays on one engine.
The trainer's weight updates reach the engines as an ``ObjectRef`` straight from the
training actor, without passing through the driver: with LoRA, only the adapter tensors.

With ``--lora-tasks`` every task has its own prompts, eval sets and reward (built from
:func:`slime.utils.tasks.task_args`, by the code a one-task run uses) and its own engine adapter,
named after the task.  A rollout draws ``--rollout-batch-size`` prompts of every task and sends
all of them to the engines in one ``generate`` call per engine, each request naming its task's
adapter; task ``k``'s prompt groups are numbered after task ``k - 1``'s.

A rollout is :meth:`RolloutManager.start`-ed (prompts drawn, engine calls submitted) and then
:meth:`RolloutManager.finish`-ed (outputs awaited, scored): ``--async-rollout`` starts rollout
``N + 1`` before the trainer steps on rollout ``N``.  An engine actor runs its calls in order, so
a rollout started before a weight sync samples with the weights before it; the batch records
that version (``policy_version``).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import time
from collections import deque
from dataclasses import dataclass, field

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
from slime.utils.errors import UserError
from slime.utils.tasks import FLAG, task_args


@dataclass
class PendingRollout:
    """A started rollout: its samples (responses not yet in), the engines' output refs, and the data
    position before its prompts were drawn (what a checkpoint taken meanwhile must record)."""

    rollout_id: int
    samples: list[Sample]
    parts: list[tuple["TaskData", slice]]
    refs: list[ray.ObjectRef]
    policy_version: int
    state_before: dict
    started: float


@dataclass
class TaskData:
    """What one task samples from and is scored by.

    ``name`` is ``None`` in a one-task run (metric keys unprefixed, state ``{"dataset": ...}``);
    ``args`` is the flags as that task's one-task run sees them; ``adapter`` the engine adapter
    its requests name (``None``: the base model, full-parameter runs).
    """

    name: str | None
    args: argparse.Namespace
    adapter: str | None
    dataset: PromptDataset | None
    eval_sets: dict[str, PromptDataset] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{self.name}/" if self.name else ""


def build_tasks(args: argparse.Namespace, tokenizer, max_positions: int) -> list[TaskData]:
    """One :class:`TaskData` per ``--lora-tasks`` task (one unnamed one without the flag); each
    reward is resolved now, so a bad reward fails before any training."""
    views = [(task.name, task_args(args, task)) for task in args.tasks] or [(None, args)]
    tasks = []
    for name, view in views:
        load_reward_fn(view)  # resolved (and cached) now
        # The datasets preflight built and validated: same files, tokenizer and prompt limits.
        dataset = PromptDataset.from_args(view, tokenizer, max_positions=max_positions) if view.prompt_data else None
        pairs = view.eval_prompt_data or []
        eval_sets = {set_name: PromptDataset.from_args(view, tokenizer, path=path, eval_set=True,
                                                       max_positions=max_positions)
                     for set_name, path in zip(pairs[::2], pairs[1::2])}
        adapter = name or (POLICY_ADAPTER if args.use_lora else None)
        tasks.append(TaskData(name, view, adapter, dataset, eval_sets))
    return tasks


class RolloutManager:
    """Generates and scores one rollout at a time; evaluates the held-out sets."""

    def __init__(self, args: argparse.Namespace, group: PlacementGroup, bundles: range) -> None:
        """Starts the engines and returns without waiting for them: they load their model while the
        caller starts the trainers; :meth:`wait_ready` waits until they are up."""
        from transformers import AutoTokenizer

        self.args = args
        # Independent actors (no torch.distributed world), each running the chosen engine class.
        self.engines = RayActorGroup(engine_class(args.rollout_engine), len(bundles), group,
                                     use_gpu=torch.cuda.is_available(), kwargs=engine_kwargs(args),
                                     first_bundle=bundles.start, env_vars=allocator_env(args.allocator),
                                     distributed=False, name="the rollout engine", timeout_s=args.actor_timeout)
        self._pid_refs = self.engines.async_call("pid")
        self.tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
        positions = ModelArch.from_checkpoint(args.hf_checkpoint).max_position_embeddings
        self.tasks = build_tasks(args, self.tokenizer, positions)
        self.policy_version = 0  # the trainer version of the newest weights handed to the engines

    def wait_ready(self) -> list[int]:
        """Wait until every engine has started; their process ids (failure reports name them too)."""
        self.engines.pids = self.engines.get(self._pid_refs, "pid")
        return self.engines.pids

    @property
    def multitask(self) -> bool:
        return self.tasks[0].name is not None

    # ------------------------------------------------------------------ weights

    def update_weights(self, payload_ref: ray.ObjectRef, adapter: str = POLICY_ADAPTER, *,
                       version: int | None = None) -> dict:
        """Hand every engine the trainer's export (an ObjectRef resolved inside each engine actor),
        loaded under ``adapter`` (a task's name in a ``--lora-tasks`` run); ``version``: the trainer
        version it is (rollouts started from now on record it).

        ``sync/bytes`` and ``sync/tensors`` add up over the engines; ``sync/engine_seconds`` is the slowest."""
        # A one-task run makes the call it always made (engines written before adapters had names).
        call = (payload_ref,) if adapter == POLICY_ADAPTER else (payload_ref, adapter)
        results = self.engines.call("apply_update", *call)
        if version is not None:
            self.policy_version = version
        metrics = dict(results[0])
        for key in ("sync/bytes", "sync/tensors"):
            metrics[key] = sum(r[key] for r in results)
        metrics["sync/engine_seconds"] = max(r["sync/engine_seconds"] for r in results)
        return metrics

    # ------------------------------------------------------------------ rollout

    def num_rollout_per_epoch(self) -> int:
        """Rollouts in one pass over the prompts: of the smallest task's file with ``--lora-tasks``."""
        sizes = [len(t.dataset) for t in self.tasks if t.dataset]
        return max(1, min(sizes) // self.args.rollout_batch_size) if sizes else 0

    def _submit(self, samples: list[Sample], params: SamplingParams, group_size: int,
                parts: list[tuple[TaskData, slice]]) -> list[ray.ObjectRef]:
        """Submit every sample in one call per engine (``parts``: which rows belong to which task)."""
        prompts = [s.prompt_token_ids for s in samples]
        if len(parts) == 1:
            names = parts[0][0].adapter  # one name for all: the call a one-task run always made
        else:
            names = [task.adapter for task, rows in parts for _ in range(rows.start, rows.stop)]
        shares = engine_shares(len(samples), group_size, len(self.engines))
        calls = [(prompts[share], params, names if isinstance(names, (str, type(None))) else names[share])
                 for share in shares]
        return self.engines.async_call_each("generate", calls)

    def _collect(self, samples: list[Sample], refs: list[ray.ObjectRef], parts: list[tuple[TaskData, slice]]) -> None:
        """The engines' outputs into ``samples``, then each task's rows scored with its reward."""
        outputs = [out for part in self.engines.get(refs, "generate", ranks=range(len(refs))) for out in part]
        for sample, out in zip(samples, outputs):
            sample.response_token_ids = out.token_ids
            sample.rollout_logprobs = out.logprobs
            sample.response = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)

        async def score() -> list[list[float]]:
            return await asyncio.gather(*(batch_rewards(task.args, samples[rows]) for task, rows in parts))

        for (_, rows), rewards in zip(parts, asyncio.run(score())):
            for sample, reward in zip(samples[rows], rewards):
                sample.reward = reward

    def generate(self, rollout_id: int) -> tuple[RolloutBatch, dict]:
        """Sample ``--rollout-batch-size`` prompts x ``--n-samples-per-prompt`` (of every task); score; advantages.

        Returns the :class:`RolloutBatch` to train on (``tasks`` set with ``--lora-tasks``) and the
        rollout metrics (``<task>/rollout/...`` per task, plus the overall ones).
        """
        return self.finish(self.start(rollout_id))

    def start(self, rollout_id: int) -> PendingRollout:
        """Draw the rollout's prompts and submit them to the engines (returns at once)."""
        args, n = self.args, self.args.n_samples_per_prompt
        state_before, start = self.state_dict(), time.time()
        samples: list[Sample] = []
        parts: list[tuple[TaskData, slice]] = []
        for task in self.tasks:
            drawn = repeat_prompts(task.dataset.next_batch(args.rollout_batch_size), n)
            first_group = samples[-1].group_index + 1 if samples else 0
            for sample in drawn:
                sample.group_index += first_group  # group ids stay unique across tasks
            parts.append((task, slice(len(samples), len(samples) + len(drawn))))
            samples += drawn
        params = SamplingParams(max_new_tokens=args.rollout_max_response_len, temperature=args.rollout_temperature,
                                top_p=args.rollout_top_p, top_k=args.rollout_top_k, seed=args.seed * 100003 + rollout_id)
        refs = self._submit(samples, params, n, parts)
        return PendingRollout(rollout_id, samples, parts, refs, self.policy_version, state_before, start)

    def finish(self, pending: PendingRollout) -> tuple[RolloutBatch, dict]:
        """Wait for a started rollout's outputs, score them, and build the batch and its metrics."""
        args, n, samples, parts = self.args, self.args.n_samples_per_prompt, pending.samples, pending.parts
        waited = time.time()
        self._collect(samples, pending.refs, parts)
        seconds, waited = time.time() - pending.started, time.time() - waited
        rewards = [s.reward for s in samples]
        advantages = group_advantages(rewards, n, args.advantage_estimator).tolist()
        tasks = [task.name for task, rows in parts for _ in range(rows.start, rows.stop)] if self.multitask else None
        batch = RolloutBatch.from_samples(samples, advantages, tasks=tasks, policy_version=pending.policy_version)
        metrics = {}
        for task, rows in parts:
            metrics |= rollout_metrics(samples[rows], n, args.rollout_max_response_len, task.dataset.epoch, task.prefix)
        lengths = [len(s.response_token_ids) for s in samples]
        metrics |= {
            "rollout/reward_mean": sum(rewards) / len(rewards),
            "rollout/tokens_per_second": sum(lengths) / max(seconds, 1e-9),
            "perf/rollout_seconds": seconds, "perf/rollout_wait_seconds": waited,
        }
        return batch, metrics

    def eval(self, rollout_id: int) -> dict:
        """Reward mean per held-out set (greedy with --eval-temperature 0): ``eval/<set>/...``, or
        ``<task>/eval/<set>/...`` with every task's sets generated in one call per engine."""
        sets = [(task, name, dataset) for task in self.tasks for name, dataset in task.eval_sets.items()]
        if not self.multitask:  # one call per set, as always
            metrics = {}
            for task, name, dataset in sets:
                start = time.time()
                metrics |= self._eval_sets([(task, name, dataset)])
                metrics[f"perf/eval_{name}_seconds"] = time.time() - start
            return metrics
        start = time.time()
        metrics = self._eval_sets(sets) if sets else {}
        return metrics | ({"perf/eval_seconds": time.time() - start} if sets else {})

    def _eval_sets(self, sets: list[tuple[TaskData, str, PromptDataset]]) -> dict:
        """Generate and score ``sets`` (``(task, set name, dataset)``) in one call per engine."""
        args, n = self.args, self.args.n_samples_per_eval_prompt
        samples: list[Sample] = []
        parts = []
        for task, _, dataset in sets:
            drawn = [copy.copy(s) for s in dataset.samples() for _ in range(n)]
            parts.append((task, slice(len(samples), len(samples) + len(drawn))))
            samples += drawn
        params = SamplingParams(max_new_tokens=args.eval_max_response_len, temperature=args.eval_temperature,
                                seed=args.seed + 7)
        self._collect(samples, self._submit(samples, params, n, parts), parts)
        metrics = {}
        for (task, name, _), (_, rows) in zip(sets, parts):
            part = samples[rows]
            metrics[f"{task.prefix}eval/{name}/reward_mean"] = sum(s.reward for s in part) / len(part)
            lengths = [len(s.response_token_ids) for s in part]
            metrics[f"{task.prefix}eval/{name}/response_len_mean"] = sum(lengths) / len(lengths)
        return metrics

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """Where each prompt sampler stands: ``{"dataset": ...}``, or with ``--lora-tasks``
        ``{"tasks": {name: ...}}``."""
        if self.multitask:
            return {"tasks": {task.name: task.dataset.state_dict() for task in self.tasks}}
        return {"dataset": self.tasks[0].dataset.state_dict()} if self.tasks[0].dataset else {}

    def load_state_dict(self, state: dict) -> None:
        if not self.multitask:
            if self.tasks[0].dataset and "dataset" in state:
                self.tasks[0].dataset.load_state_dict(state["dataset"])
            return
        saved = state.get("tasks", {})
        missing = [task.name for task in self.tasks if task.name not in saved]
        if missing:
            raise UserError(f"{FLAG} {self.args.lora_tasks}: the checkpoint has no data position for task(s) "
                            f"{', '.join(missing)} (it was saved with tasks {', '.join(sorted(saved)) or 'none'}); "
                            "resume with the task file it was saved with")
        for task in self.tasks:
            task.dataset.load_state_dict(saved[task.name])


class RolloutStream:
    """The run's rollouts in order, each started ``ahead`` rollouts before the trainer takes it.

    ``ahead = 0``: a rollout is generated when asked for (the synchronous loop).  ``ahead = k``
    (``--async-rollout --max-staleness k``): when rollout ``N`` is handed out, rollouts up to
    ``N + k`` are already submitted, so the engines sample them while the trainer steps on ``N``,
    with the weights of up to ``k`` versions ago.
    """

    def __init__(self, manager: RolloutManager, first: int, end: int, ahead: int) -> None:
        self.manager, self.next_id, self.end, self.ahead = manager, first, end, ahead
        self.pending: deque[PendingRollout] = deque()

    def next(self, rollout_id: int) -> tuple[RolloutBatch, dict]:
        """Rollout ``rollout_id``'s batch and metrics (waits for its outputs), then the next ones started."""
        if not self.pending:
            self._start()
        pending = self.pending.popleft()
        assert pending.rollout_id == rollout_id, (pending.rollout_id, rollout_id)
        batch, metrics = self.manager.finish(pending)
        while len(self.pending) < self.ahead and self.next_id < self.end:
            self._start()
        return batch, metrics

    def _start(self) -> None:
        self.pending.append(self.manager.start(self.next_id))
        self.next_id += 1

    def state_dict(self) -> dict:
        """The data position a checkpoint records: before the prompts of rollouts started but not trained."""
        return self.pending[0].state_before if self.pending else self.manager.state_dict()


def rollout_metrics(samples: list[Sample], group_size: int, max_len: int, epoch: int, prefix: str = "") -> dict:
    """``{prefix}rollout/...``: reward and response-length means, the share of prompt groups whose
    rewards are all equal (no signal), the share of responses cut at ``max_len``, the data epoch."""
    rewards = [s.reward for s in samples]
    lengths = [len(s.response_token_ids) for s in samples]
    groups = torch.tensor(rewards).view(-1, group_size)
    return {
        f"{prefix}rollout/reward_mean": sum(rewards) / len(rewards),
        f"{prefix}rollout/response_len_mean": sum(lengths) / len(lengths),
        f"{prefix}rollout/zero_std_groups": float((groups.std(dim=1) == 0).float().mean()) if group_size > 1 else 1.0,
        f"{prefix}rollout/truncated": sum(length >= max_len for length in lengths) / len(samples),
        f"{prefix}rollout/epoch": epoch,
    }


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
