"""Where everything runs: placement groups, the rollout manager and the training group.

On one node (``--actor-num-nodes 1``) one placement group holds ``world_size`` training bundles
followed by one bundle per rollout engine (``--rollout-num-engines``; with ``--colocate`` the
engines share the first training bundles instead).  Bundles are ``{GPU: 1, CPU: 1}`` on GPU
machines and ``{CPU: 1}`` otherwise.

Over ``N > 1`` nodes the trainers get a group of their own: one bundle of G units per node
(``--actor-num-gpus-per-node G``) under Ray's STRICT_SPREAD, ranks ``i*G .. i*G+G-1`` in bundle
``i``, so each node holds exactly G consecutive ranks (megatron's TP groups are consecutive ranks,
so with TP <= G each stays within a node).  PACK over ``N x G`` single bundles, as on one node, would not promise that: it fills
whichever node has room first.  The engines then take a PACK group of their own (STRICT_SPREAD
applies to every bundle of a group); ``--colocate`` over several nodes is refused.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import ray
import torch
from ray.util.placement_group import PlacementGroup, remove_placement_group

from slime.backends.megatron_utils.actor import MegatronTrainRayActor
from slime.ray.actor_group import RayActorGroup
from slime.ray.cluster import create_placement_group
from slime.ray.rollout import RolloutManager
from slime.rollout.batch import RolloutBatch
from slime.rollout.engine import POLICY_ADAPTER
from slime.rollout.engines import cpu_threads
from slime.utils.allocator import allocator_env
from slime.utils.errors import UserError


@dataclass
class PlacementGroups:
    """Where the trainers and the engines go: ``actor_group``'s bundles ``actor_bundles`` hold
    ``actors_per_bundle`` trainers each; ``rollout_group``'s ``rollout_bundles`` one engine each."""

    actor_group: PlacementGroup
    actor_bundles: range
    rollout_group: PlacementGroup
    rollout_bundles: range
    actors_per_bundle: int = 1


def num_bundles(args: argparse.Namespace) -> int:
    """Logical CPUs a private local cluster needs (one per trainer and per engine)."""
    if args.colocate:
        return max(args.world_size, args.rollout_num_engines)
    return args.world_size + args.rollout_num_engines


def create_placement_groups(args: argparse.Namespace) -> PlacementGroups:
    use_gpu = torch.cuda.is_available()
    if args.actor_num_nodes > 1:
        return _multinode_placement_groups(args, use_gpu)
    group = create_placement_group(num_bundles(args), use_gpu=use_gpu, flag="--actor-num-gpus-per-node")
    first_rollout = 0 if args.colocate else args.world_size
    return PlacementGroups(group, range(args.world_size), group,
                           range(first_rollout, first_rollout + args.rollout_num_engines))


def _multinode_placement_groups(args: argparse.Namespace, use_gpu: bool) -> PlacementGroups:
    """One bundle of ``--actor-num-gpus-per-node`` units per node (STRICT_SPREAD), engines apart."""
    if args.colocate:
        raise UserError(f"--colocate with --actor-num-nodes {args.actor_num_nodes} is not supported; "
                        "drop --colocate or use --actor-num-nodes 1")
    per_node = args.actor_num_gpus_per_node
    actors = create_placement_group(args.actor_num_nodes, use_gpu=use_gpu, flag="--actor-num-nodes",
                                    bundle_size=per_node, spread=True)
    try:
        rollout = create_placement_group(args.rollout_num_engines, use_gpu=use_gpu, flag="--rollout-num-engines")
    except BaseException:
        remove_placement_group(actors)
        raise
    return PlacementGroups(actors, range(args.actor_num_nodes), rollout, range(args.rollout_num_engines), per_node)


def create_rollout_manager(args: argparse.Namespace, pgs: PlacementGroups) -> RolloutManager:
    return RolloutManager(args, pgs.rollout_group, pgs.rollout_bundles)


class TrainGroup:
    """The training processes as one object: each verb runs on every rank (they are collectives)."""

    def __init__(self, args: argparse.Namespace, pgs: PlacementGroups) -> None:
        self.infos: list[dict] = []  # what each rank's init returned (pid, trainable count)
        self.tasks = [t.name for t in args.tasks]
        threads = cpu_threads(args)[0]
        self.group = RayActorGroup(MegatronTrainRayActor, args.world_size, pgs.actor_group,
                                   use_gpu=torch.cuda.is_available(), first_bundle=pgs.actor_bundles.start,
                                   actors_per_bundle=pgs.actors_per_bundle, name="training", timeout_s=args.actor_timeout,
                                   env_vars={"SLIME_TRAIN_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                                             **allocator_env(args.allocator)})

    def async_init(self, args: argparse.Namespace, role: str = "actor") -> list[ray.ObjectRef]:
        return self.group.async_call("init", args, role)

    def train(self, rollout_id: int, batch: RolloutBatch) -> dict:
        batch_ref = ray.put(batch)  # one copy in the object store, read by every rank
        return self.group.call("train", rollout_id, batch_ref)[0]

    def update_weights(self, rollout_manager: RolloutManager, version: int | None = None) -> dict:
        """Push the newest weights to the rollout engine (with LoRA: the adapter tensors only; with
        ``--lora-tasks``: every task's adapter, under the task's name).

        Every rank takes part in the export (TP shards are gathered); rank 0's result goes to
        the engine as an ObjectRef, so the tensors never pass through the driver.  ``version``: the
        trainer version the weights are (rollouts started afterwards record it).
        """
        start = time.time()
        metrics: dict = {}
        for task in self.tasks or [None]:
            refs = self.group.async_call("export_weights", task)
            synced = rollout_manager.update_weights(refs[0], task or POLICY_ADAPTER, version=version)
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
