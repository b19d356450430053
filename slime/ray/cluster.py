"""Starting (or joining) a Ray cluster and reserving placement groups.

:func:`ray_cluster` joins the cluster named by ``RAY_ADDRESS`` or starts a
private local one whose whole state (sockets, logs, session files) lives in a
fresh temporary directory that is removed on exit; nothing is written under
the home directory.  :func:`create_placement_group` reserves one bundle per
training/rollout process, failing with a :class:`UserError` that says what
was asked and what the cluster has, instead of waiting forever.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from slime.utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
# Ray writes an auth token under ~ unless token authentication is off.
_AUTH_MODE_VAR = "RAY_AUTH_MODE"
DEFAULT_PLACEMENT_TIMEOUT_S = 60.0


def worker_runtime_env() -> dict:
    """Runtime env that lets workers ``import slime``: the repo root on PYTHONPATH."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}


@contextmanager
def ray_cluster(num_cpus: int | None = None) -> Iterator[None]:
    """Connect to ``$RAY_ADDRESS`` if set, else start a private local cluster.

    ``num_cpus`` sets the local cluster's logical CPUs; it may exceed the
    physical cores, since each CPU bundle only needs a slot for one mostly
    idle process (ignored when joining an existing cluster, whose resources
    are fixed).  Ray is shut down and the local temp dir removed on normal
    exit, on exceptions and on KeyboardInterrupt.
    """
    address = os.environ.get("RAY_ADDRESS")
    common = dict(
        include_dashboard=False,
        log_to_driver=True,
        logging_level=logging.WARNING,
        runtime_env=worker_runtime_env(),
    )
    if address:
        ray.init(address=address, **common)
        try:
            yield
        finally:
            ray.shutdown()
        return

    temp_dir = tempfile.mkdtemp(prefix="slime-ray-")
    previous_auth_mode = os.environ.get(_AUTH_MODE_VAR)
    # A user who configured authentication on purpose keeps it.
    os.environ.setdefault(_AUTH_MODE_VAR, "disabled")
    try:
        ray.init(num_cpus=num_cpus, _temp_dir=temp_dir, **common)
        yield
    finally:
        ray.shutdown()
        _restore_env(_AUTH_MODE_VAR, previous_auth_mode)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _bundle(use_gpu: bool) -> dict[str, float]:
    return {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}


def _shortfall(num_bundles: int, use_gpu: bool, resources: dict[str, float]) -> str | None:
    """Which resource the cluster has too little of for ``num_bundles`` bundles, as
    ``"<n> GPUs"``; None when it has enough of every kind."""
    for kind, per_bundle in _bundle(use_gpu).items():
        have = int(resources.get(kind, 0))
        if have < num_bundles * per_bundle:
            return f"{have} {kind}s"
    return None


def create_placement_group(
    num_bundles: int,
    use_gpu: bool,
    *,
    flag: str = "--actor-num-gpus-per-node",
    timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
) -> PlacementGroup:
    """Reserve ``num_bundles`` bundles, packed onto as few nodes as possible.

    Each bundle is ``{"GPU": 1, "CPU": 1}`` when ``use_gpu`` else ``{"CPU": 1}``;
    one actor of a :class:`~slime.ray.actor_group.RayActorGroup` runs in each.
    ``flag`` names the option the user set the count with, for the error.

    Raises UserError at once when the cluster's total resources are too small,
    and after ``timeout_s`` when they exist but are held by someone else.
    """
    kind = "GPU" if use_gpu else "CPU"
    asked = f"{flag} {num_bundles} needs {num_bundles} {kind} bundles"
    shortfall = _shortfall(num_bundles, use_gpu, ray.cluster_resources())
    if shortfall:
        raise UserError(f"{asked} but the Ray cluster has {shortfall}; lower {flag} or add resources")

    group = placement_group([_bundle(use_gpu) for _ in range(num_bundles)], strategy="PACK")
    if not group.wait(timeout_seconds=timeout_s):
        remove_placement_group(group)
        free = _shortfall(num_bundles, use_gpu, ray.available_resources())
        raise UserError(
            f"{asked} but the Ray cluster has only {free or 'fewer'} free after {timeout_s:g} s "
            f"(others hold the rest); lower {flag} or free resources"
        )
    return group
