"""Where everything runs: placement groups, the rollout manager and the training group.

One placement group holds ``world_size`` training bundles followed by one bundle per rollout
engine (``--rollout-num-engines``; with ``--colocate`` the engines share the first training
bundles instead).  Bundles are ``{GPU: 1, CPU: 1}`` on GPU machines and ``{CPU: 1}`` otherwise.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import ray
import torch
from ray.util.placement_group import PlacementGroup

from slime.backends.megatron_utils.actor import MegatronTrainRayActor
from slime.ray.actor_group import RayActorGroup
from slime.ray.cluster import create_placement_group
from slime.ray.rollout import RolloutManager
from slime.rollout.batch import RolloutBatch
from slime.utils.allocator import allocator_env


@dataclass
class PlacementGroups:
    group: PlacementGroup
    actor_bundles: range
    rollout_bundles: range


def num_bundles(args: argparse.Namespace) -> int:
    if args.colocate:
        return max(args.world_size, args.rollout_num_engines)
    return args.world_size + args.rollout_num_engines


def create_placement_groups(args: argparse.Namespace) -> PlacementGroups:
    total = num_bundles(args)
    group = create_placement_group(total, use_gpu=torch.cuda.is_available(), flag="--actor-num-gpus-per-node")
    first_rollout = 0 if args.colocate else args.world_size
    return PlacementGroups(group, range(args.world_size), range(first_rollout, first_rollout + args.rollout_num_engines))


def create_rollout_manager(args: argparse.Namespace, pgs: PlacementGroups) -> RolloutManager:
    return RolloutManager(args, pgs.group, pgs.rollout_bundles)


class TrainGroup:
    """The training processes as one object: each verb runs on every rank (they are collectives)."""

    def __init__(self, args: argparse.Namespace, pgs: PlacementGroups) -> None:
        self.infos: list[dict] = []  # what each rank's init returned (pid, trainable count)
        self.tasks = [t.name for t in args.tasks]
        threads = max(1, (os.cpu_count() or 1) // args.world_size)
        self.group = RayActorGroup(MegatronTrainRayActor, args.world_size, pgs.group, use_gpu=torch.cuda.is_available(),
                                   first_bundle=pgs.actor_bundles.start, name="training", timeout_s=args.actor_timeout,
                                   env_vars={"SLIME_TRAIN_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                                             **allocator_env(args.allocator)})

    def async_init(self, args: argparse.Namespace, role: str = "actor") -> list[ray.ObjectRef]:
        return self.group.async_call("init", args, role)

    def train(self, rollout_id: int, batch: RolloutBatch) -> dict:
        batch_ref = ray.put(batch)  # one copy in the object store, read by every rank
        return self.group.call("train", rollout_id, batch_ref)[0]

    def update_weights(self, rollout_manager: RolloutManager) -> dict:
        """Push the newest weights to the rollout engine (with LoRA: the adapter tensors only; with
        ``--lora-tasks``: every task's adapter, under the task's name).

        Every rank takes part in the export (TP shards are gathered); rank 0's result goes to
        the engine as an ObjectRef, so the tensors never pass through the driver.
        """
        start = time.time()
        metrics: dict = {}
        for task in self.tasks or [None]:
            refs = self.group.async_call("export_weights", task)
            synced = rollout_manager.update_weights(refs[0], task) if task else rollout_manager.update_weights(refs[0])
            self.group.get(refs[1:], "export_weights", ranks=range(1, len(refs)))
            for key, value in synced.items():  # bytes and tensors add up over the adapters
                metrics[key] = metrics.get(key, 0) + value if key in ("sync/bytes", "sync/tensors") else value
            if task:
                metrics |= {f"{task}/{k}": v for k, v in synced.items() if k == "sync/adapter_version"}
        metrics["sync/seconds"] = time.time() - start
        return metrics

    def save(self, rollout_id: int, extra_state: dict) -> None:
        self.group.call("save", rollout_id, extra_state)

    def load(self) -> tuple[int, dict]:
        return self.group.call("load")[0]

    def pids(self) -> list[int]:
        return [info["pid"] for info in self.infos]


def create_training_models(args: argparse.Namespace, pgs: PlacementGroups) -> TrainGroup:
    """Start the training actors and build the policy in each (LoRA inside, optimizer after)."""
    actor_model = TrainGroup(args, pgs)
    actor_model.infos = actor_model.group.get(actor_model.async_init(args, role="actor"), "init")
    actor_model.group.pids = actor_model.pids()  # failure reports name each rank's process
    return actor_model
