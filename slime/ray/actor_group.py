"""A group of Ray actors, placed in the bundles of a placement group, that form one
``torch.distributed`` world.

Actor ``i`` runs in bundle ``first_bundle + i // actors_per_bundle`` and is constructed as
``actor_cls(*args, rank=i, world_size=N, **kwargs)``.  Its environment holds
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, so
``torch.distributed.init_process_group(backend)`` needs no further arguments.
Nothing assumes one node: ``MASTER_ADDR`` is the IP of the node holding rank 0's bundle and
``MASTER_PORT`` a port found free *on that node* (by a task run in that bundle), not on the
driver's machine.
With ``distributed=False`` the actors are independent processes (e.g. the rollout
engine): constructed as ``actor_cls(*args, **kwargs)``, with none of those variables.

Errors: a :class:`UserError` raised inside an actor method reaches the driver
as that same UserError (not wrapped in Ray's ``RayTaskError`` with a remote
traceback), so the CLI prints one line.  Other errors keep Ray's wrapping and
the remote traceback.  An exception in an actor's *constructor* kills the
actor and Ray reports only ``ActorDiedError`` text; validate user input in a
method (e.g. ``group.call("init", ...)``) rather than in ``__init__``.

Deadlines: a group made with ``timeout_s`` waits at most that long for one call
(``--actor-timeout``) and then raises :class:`ActorTimeoutError` naming the
actors that have not answered.  Every group is registered
(:func:`registered_groups`), so a failure can be traced to the actor it came
from by :mod:`slime.ray.faults`; ``name`` and ``pids`` say how to call each one.
"""

from __future__ import annotations

import socket
import time
import weakref
from typing import Any, Iterable, Sequence

import ray
from ray.exceptions import RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from slime.utils.errors import UserError

PLACEMENT_READY_TIMEOUT_S = 60.0


def find_free_port() -> int:
    """A TCP port free on this host now (the OS picks it; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@ray.remote(num_cpus=0)
def _free_port_on_this_node() -> int:
    return find_free_port()


def free_port_in_bundle(group: PlacementGroup, bundle_index: int) -> int:
    """A TCP port free on the node of one bundle, found by a zero-CPU task run in that bundle (so it
    never waits for the bundle's CPU, held or not).  Rank 0 listens on its own node, which need not
    be the driver's: a port probed on the driver could be taken there."""
    strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=bundle_index)
    ref = _free_port_on_this_node.options(scheduling_strategy=strategy).remote()
    return get_all([ref], timeout_s=PLACEMENT_READY_TIMEOUT_S, labels=[f"the port probe in bundle {bundle_index}"],
                   method="find_free_port")[0]


def _node_id(instance: object) -> str:
    """Run inside an actor (through Ray's ``__ray_call__``): the Ray node id it runs on."""
    return ray.get_runtime_context().get_node_id()


def bundle_node_ip(group: PlacementGroup, bundle_index: int) -> str:
    """IP address of the node that holds one bundle (rank 0 listens there)."""
    node_id = placement_group_table(group)["bundles_to_node_id"][bundle_index]
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    raise RuntimeError(f"bundle {bundle_index} is on node {node_id}, which Ray does not list")


def user_error_cause(error: BaseException) -> UserError | None:
    """The UserError a Ray task raised, if ``error`` wraps one."""
    cause = error.cause if isinstance(error, RayTaskError) else None
    return cause if isinstance(cause, UserError) else None


class ActorTimeoutError(Exception):
    """Calls that have not returned within their deadline: ``who`` (one label per late actor),
    the ``method`` and the deadline in ``seconds``."""

    def __init__(self, who: Sequence[str], method: str, seconds: float) -> None:
        self.who, self.method, self.seconds = list(who), method, seconds
        verb = "has" if len(self.who) == 1 else "have"
        super().__init__(f"{', '.join(self.who)} {verb} not returned from {method} after {seconds:g} s")


def get_all(refs: Sequence[ray.ObjectRef], *, timeout_s: float | None = None, labels: Sequence[str] | None = None,
            method: str = "a call") -> list[Any]:
    """``ray.get`` that fails as soon as any task fails, or when ``timeout_s`` (None or 0: no limit) passes.

    Plain ``ray.get(refs)`` waits on the refs in order, so when rank 1 fails
    while rank 0 blocks in a collective waiting for it, it would hang; here
    the first failure raises at once.  A wrapped UserError is re-raised bare.
    Past the deadline, :class:`ActorTimeoutError` names the refs still pending by
    ``labels`` (one per ref; default ``task i``) and ``method``.
    """
    refs = list(refs)
    pending = list(refs)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                late = {ref: i for i, ref in enumerate(refs)}
                names = [labels[late[ref]] if labels else f"task {late[ref]}" for ref in pending]
                raise ActorTimeoutError(names, method, timeout_s or 0.0)
            ray.get(ready)
        return ray.get(refs)
    except RayTaskError as error:
        cause = user_error_cause(error)
        if cause is None:
            raise
        raise cause from None


def _world_env(group: PlacementGroup, first_bundle: int, num_actors: int) -> dict[str, str]:
    """The rendezvous variables every rank shares (``RANK`` is added per actor)."""
    return {
        "MASTER_ADDR": bundle_node_ip(group, first_bundle),
        "MASTER_PORT": str(free_port_in_bundle(group, first_bundle)),
        "WORLD_SIZE": str(num_actors),
        # Each actor asks for one GPU (if any): Ray makes it the only one visible, device 0.
        "LOCAL_RANK": "0",
    }


_GROUPS: "weakref.WeakSet[RayActorGroup]" = weakref.WeakSet()


def registered_groups() -> list["RayActorGroup"]:
    """Every actor group of this driver that still exists (for failure reports)."""
    return list(_GROUPS)


class RayActorGroup:
    """``num_actors`` instances of a plain class, ``actors_per_bundle`` (default 1) per bundle of ``group``.

    Shapes: ``ceil(num_actors / actors_per_bundle)`` bundles from ``first_bundle`` on must exist
    in ``group``; ``actors_per_bundle`` consecutive ranks share one (over several nodes: one bundle
    per node, so a node's ranks are consecutive), each actor reserving 1 CPU of it (and 1 GPU
    when ``use_gpu``).  ``env_vars`` go to every actor's environment.  ``name``
    (default: the class name) and ``pids`` (set by the owner once known) make the
    actors' labels, ``"NAME (pid P)"`` or, in a torch world, ``"NAME rank i (pid P)"``;
    ``timeout_s`` bounds every wait on one call (None or 0: no limit).
    """

    def __init__(
        self,
        actor_cls: type,
        num_actors: int,
        group: PlacementGroup,
        *,
        use_gpu: bool,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        first_bundle: int = 0,
        env_vars: dict[str, str] | None = None,
        distributed: bool = True,
        name: str | None = None,
        timeout_s: float | None = None,
        actors_per_bundle: int = 1,
    ) -> None:
        if num_actors < 1 or actors_per_bundle < 1:
            raise ValueError(f"num_actors and actors_per_bundle must be >= 1, got {num_actors}, {actors_per_bundle}")
        last_bundle = first_bundle + (num_actors - 1) // actors_per_bundle
        if last_bundle >= group.bundle_count:
            raise ValueError(f"bundles {first_bundle}..{last_bundle} asked, the placement group has {group.bundle_count}")
        if not group.wait(timeout_seconds=PLACEMENT_READY_TIMEOUT_S):
            # Rank 0's node (for MASTER_ADDR) is only known once bundles are placed.
            raise RuntimeError("placement group not ready; create it with slime.ray.cluster.create_placement_group")
        self.name = name or actor_cls.__name__
        self.distributed = distributed
        self.timeout_s = timeout_s
        self.pids: list[int] = []
        self._answered = False  # Ray queues the first call behind the constructor: its wait includes start-up
        remote_cls = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(actor_cls)
        world = _world_env(group, first_bundle, num_actors) if distributed else None
        self.actors: list[ray.actor.ActorHandle] = []
        for rank in range(num_actors):
            env = dict(env_vars or {})
            rank_kwargs = {}
            if world is not None:
                env.update(world, RANK=str(rank))
                rank_kwargs = {"rank": rank, "world_size": num_actors}
            # Ray merges these env_vars into the job's runtime_env (which puts slime on PYTHONPATH).
            options = remote_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=first_bundle + rank // actors_per_bundle
                ),
                runtime_env={"env_vars": env},
            )
            self.actors.append(options.remote(*args, **rank_kwargs, **(kwargs or {})))
        _GROUPS.add(self)

    def __len__(self) -> int:
        return len(self.actors)

    def label(self, rank: int) -> str:
        """How reports name actor ``rank``: ``the rollout engine (pid 12)``, ``training rank 1 (pid 13)``."""
        who = f"{self.name} rank {rank}" if self.distributed else self.name
        return f"{who} (pid {self.pids[rank]})" if rank < len(self.pids) else who

    def get(self, refs: Sequence[ray.ObjectRef], method: str, ranks: Iterable[int] | None = None) -> list[Any]:
        """:func:`get_all` of one call's refs (of ``ranks``, default all, in order) under this group's deadline."""
        labels = [self.label(rank) for rank in (range(len(refs)) if ranks is None else ranks)]
        if not self._answered:
            method = f"{method} (its first call, so including its start-up)"
        results = get_all(refs, timeout_s=self.timeout_s, labels=labels, method=method)
        self._answered = True
        return results

    def async_call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Start ``method(*args, **kwargs)`` on every actor; one ref per rank, in rank order."""
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``method`` on every actor and return the results in rank order."""
        return self.get(self.async_call(method, *args, **kwargs), method)

    def async_call_each(self, method: str, args_per_rank: Sequence[tuple]) -> list[ray.ObjectRef]:
        """Start ``method(*args_per_rank[i])`` on actor ``i`` for each given tuple (ranks beyond the list
        sit out); one ref per started call, in rank order (not for methods that enter a collective)."""
        return [getattr(actor, method).remote(*args) for actor, args in zip(self.actors, args_per_rank)]

    def call_each(self, method: str, args_per_rank: Sequence[tuple]) -> list[Any]:
        """:meth:`async_call_each`, then its results in rank order."""
        refs = self.async_call_each(method, args_per_rank)
        return self.get(refs, method, ranks=range(len(refs)))

    def call_rank0(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method`` on rank 0 only (not for methods that enter a collective)."""
        return self.get([getattr(self.actors[0], method).remote(*args, **kwargs)], method)[0]

    def node_ids(self) -> list[str]:
        """The Ray node id each actor runs on, asked of the actors themselves (rank order)."""
        return self.get([actor.__ray_call__.remote(_node_id) for actor in self.actors], "node_id")

    def kill(self) -> None:
        """Kill every actor at once, freeing their bundles; the group is empty after."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
