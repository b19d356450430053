"""Starting (or joining) a Ray cluster and reserving placement groups.

:func:`ray_cluster` joins the cluster named by ``--ray-address`` (else ``$RAY_ADDRESS``) or
starts a private local one whose whole state (sockets, logs, session files) lives in a
fresh temporary directory that is removed on exit; nothing is written under
the home directory.  A run that ends without cleaning up (``kill -9``) leaves
that directory and a few Ray agents behind: the next run removes both (see
:func:`reap_stale_temp_dirs`).  :func:`create_placement_group` reserves one
bundle per training/rollout process (over several nodes: one per node), failing with a
:class:`UserError` that says what was asked and what the cluster has, instead of waiting forever.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from slime.utils.atomic import write_json_atomically
from slime.utils.errors import UserError
from slime.utils.failpoints import ENV as FAILPOINT_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
# Ray writes an auth token under ~ unless token authentication is off.
_AUTH_MODE_VAR = "RAY_AUTH_MODE"
DEFAULT_PLACEMENT_TIMEOUT_S = 60.0
# A private cluster's temp dir: <temp root>/slime-ray-XXXXXXXX, owned by the driver named in OWNER_FILE.
TEMP_PREFIX = "slime-ray-"
OWNER_FILE = "slime-owner.json"
# A temp dir without an owner record is left alone this long (its run may be writing the record).
_UNOWNED_GRACE_S = 60.0
_KILL_WAIT_S = 10.0


def worker_runtime_env() -> dict:
    """Runtime env that lets workers ``import slime``: the repo root on PYTHONPATH (and a test's
    ``SLIME_FAILPOINT``, also to workers of a cluster this driver joined: see :mod:`slime.utils.failpoints`)."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    if os.environ.get(FAILPOINT_ENV):
        env[FAILPOINT_ENV] = os.environ[FAILPOINT_ENV]
    return {"env_vars": env}


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster to join: ``address`` (``--ray-address``) when given, else ``$RAY_ADDRESS``,
    else None (start a private one).  The flag wins so that one command line means the same run
    whatever the shell exported."""
    return address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_cluster(num_cpus: int | None = None, address: str | None = None) -> Iterator[None]:
    """Join the cluster at :func:`cluster_address` (``address``, else ``$RAY_ADDRESS``) if any, else
    start a private local cluster.

    Joining creates no local temp dir and reaps nothing: the cluster, its temp dirs and its
    processes belong to whoever started it (``ray start``); only this driver is disconnected.

    ``num_cpus`` sets the local cluster's logical CPUs; it may exceed the
    physical cores, since each CPU bundle only needs a slot for one mostly
    idle process (ignored when joining an existing cluster, whose resources
    are fixed).  Ray is shut down, its processes ended and the local temp dir
    removed on normal exit, on exceptions, on KeyboardInterrupt and on SIGTERM
    (which raises ``SystemExit(143)`` inside).  Before starting, the temp dirs
    of killed runs are removed (:func:`reap_stale_temp_dirs`).
    """
    address = cluster_address(address)
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

    main_thread = threading.current_thread() is threading.main_thread()
    # Python's default SIGTERM ends the process without running ``finally``; raise instead.
    # (ray.init installs a handler of its own and never removes it: the previous one is restored.)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_system_exit) if main_thread else None
    previous_auth_mode = os.environ.get(_AUTH_MODE_VAR)
    temp_dir = None
    try:
        reap_stale_temp_dirs(Path(tempfile.gettempdir()))
        temp_dir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        write_json_atomically(temp_dir / OWNER_FILE, _owner_record(os.getpid()))
        # A user who configured authentication on purpose keeps it.
        os.environ.setdefault(_AUTH_MODE_VAR, "disabled")
        ray.init(num_cpus=num_cpus, _temp_dir=str(temp_dir), **common)
        if main_thread:  # ray.init's own handler exits with status 15
            signal.signal(signal.SIGTERM, _raise_system_exit)
        yield
    finally:
        if main_thread:  # a second SIGTERM must not cut the clean-up short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            ray.shutdown()
            _restore_env(_AUTH_MODE_VAR, previous_auth_mode)
            if temp_dir is not None:
                _kill_processes(_processes_using(temp_dir))  # anything ray.shutdown left running
                shutil.rmtree(temp_dir, ignore_errors=True)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_sigterm is None else previous_sigterm)


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------------------------
# Temp dirs and Ray processes left by runs that were killed (Linux /proc; elsewhere nothing is
# reaped)
# ---------------------------------------------------------------------------------------------

def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _process_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` (clock ticks after boot, /proc/<pid>/stat field 22); None
    when no such process runs (gone or a zombie).  (pid, start time) names one process: a pid can
    be reused, the pair cannot."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None or ")" not in stat:
        return None
    fields = stat[stat.rindex(")") + 1:].split()  # after the command name, which may hold anything
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _owner_record(pid: int) -> dict:
    return {"pid": pid, "start_time": _process_start_time(pid),
            "boot_id": (_read_text("/proc/sys/kernel/random/boot_id") or "").strip(), "pid_ns": _pid_namespace()}


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _owner_alive(temp_dir: Path) -> bool | None:
    """Whether the driver that made ``temp_dir`` still runs; None when the dir names no owner."""
    try:
        owner = json.loads((temp_dir / OWNER_FILE).read_text())
        pid, start_time, boot_id, pid_ns = owner["pid"], owner["start_time"], owner["boot_id"], owner["pid_ns"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(pid, int) or not isinstance(start_time, int):
        return None
    if boot_id != (_read_text("/proc/sys/kernel/random/boot_id") or "").strip():
        return False  # written before a reboot: nothing of it runs any more
    if pid_ns != _pid_namespace():
        return True  # another container's run: its processes are out of sight, leave it alone
    return _process_start_time(pid) == start_time


def _mentions(text: str, paths: tuple[str, ...]) -> bool:
    """Whether ``text`` (an argument, a link) names one of ``paths`` or something under it (not a
    longer sibling name)."""
    text = text.removesuffix(" (deleted)") + "/"
    return any(path + "/" in text for path in paths)


def _is_ray_program(args: list[str]) -> bool:
    """Whether a command line is one of Ray's processes: a renamed agent or worker (``ray::IDLE``),
    a binary of the ray package (``.../ray/core/src/ray/raylet/raylet``) or python running one
    of its scripts (``python -u .../ray/_private/log_monitor.py``)."""
    if not args or not args[0]:
        return False
    if args[0].startswith("ray::") or "/ray/" in args[0]:
        return True
    script = next((arg for arg in args[1:] if not arg.startswith("-")), "")
    return os.path.basename(args[0]).startswith("python") and "/ray/" in script


def _processes_using(temp_dir: Path) -> list[tuple[int, int]]:
    """``(pid, start time)`` of this user's Ray processes (this one excepted) whose command line
    names ``temp_dir`` or that hold a file under it open.  Ray renames its agents and workers
    (``ray::DashboardAgent``, ``ray::IDLE``), so their open log files are what give them away.
    Other programs (a ``tail -f`` of a Ray log) are never counted, so never killed."""
    paths = tuple(dict.fromkeys((str(temp_dir), os.path.realpath(temp_dir))))
    found = []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            args = (_read_text(f"/proc/{entry.name}/cmdline") or "").split("\0")
            if not _is_ray_program(args):
                continue
            hit = any(_mentions(arg, paths) for arg in args)
            if not hit:
                fd_dir = f"/proc/{entry.name}/fd"
                hit = any(_mentions(os.readlink(f"{fd_dir}/{fd}"), paths) for fd in os.listdir(fd_dir))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
        start_time = _process_start_time(int(entry.name)) if hit else None
        if start_time is not None:
            found.append((int(entry.name), start_time))
    return found


def _kill_processes(processes: list[tuple[int, int]]) -> None:
    """SIGKILL each process still running as the same (pid, start time), and wait until they are gone."""
    for pid, start_time in processes:
        if _process_start_time(pid) == start_time:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    deadline = time.monotonic() + _KILL_WAIT_S
    while any(_process_start_time(pid) == start for pid, start in processes) and time.monotonic() < deadline:
        time.sleep(0.05)


def reap_stale_temp_dirs(root: Path) -> list[Path]:
    """Remove this user's ``slime-ray-*`` dirs under ``root`` whose driver is dead, after killing
    the Ray processes still using them (after a ``kill -9`` of the driver its dashboard and
    runtime-env agents live on for a minute or more; other programs are left alone).  A live
    run's dir is never touched; a dir without an owner record (a run writing it right now, or
    an older version's) is removed only when it is older than a minute and no Ray process uses
    it.  Returns the removed dirs."""
    removed: list[Path] = []
    if not os.path.isdir("/proc"):  # no way to tell a live run from a dead one
        return removed
    for temp_dir in sorted(root.glob(f"{TEMP_PREFIX}*")):
        try:
            info = temp_dir.lstat()
        except OSError:
            continue
        if not temp_dir.is_dir() or temp_dir.is_symlink() or info.st_uid != os.getuid():
            continue
        alive = _owner_alive(temp_dir)
        if alive:
            continue
        processes = _processes_using(temp_dir)
        if alive is None and (processes or time.time() - info.st_mtime < _UNOWNED_GRACE_S):
            continue
        _kill_processes(processes)
        shutil.rmtree(temp_dir, ignore_errors=True)
        removed.append(temp_dir)
        print(f"slime: removed {temp_dir}, the Ray temp dir of a run that was killed"
              + (f" (and {len(processes)} of its Ray processes)" if processes else ""), file=sys.stderr, flush=True)
    return removed


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _bundle(use_gpu: bool, size: int = 1) -> dict[str, float]:
    return {"GPU": size, "CPU": size} if use_gpu else {"CPU": size}


def _shortfall(num_bundles: int, use_gpu: bool, resources: dict[str, float], size: int = 1) -> str | None:
    """Which resource the cluster has too little of for ``num_bundles`` bundles of ``size``, as
    ``"<n> GPUs"``; None when it has enough of every kind."""
    for kind, per_bundle in _bundle(use_gpu, size).items():
        have = int(resources.get(kind, 0))
        if have < num_bundles * per_bundle:
            return f"{have} {kind}s"
    return None


def _nodes_short(num_nodes: int, use_gpu: bool, size: int) -> str | None:
    """For one bundle of ``size`` on each of ``num_nodes`` distinct nodes: how many live nodes
    could hold one, as ``"1 such node"``, when too few; None when enough."""
    need = _bundle(use_gpu, size)
    fit = [node for node in ray.nodes() if node.get("Alive")
           and all(node.get("Resources", {}).get(kind, 0) >= amount for kind, amount in need.items())]
    return None if len(fit) >= num_nodes else f"{len(fit)} such node{'s' * (len(fit) != 1)}"


def create_placement_group(
    num_bundles: int,
    use_gpu: bool,
    *,
    flag: str = "--actor-num-gpus-per-node",
    timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
    bundle_size: int = 1,
    spread: bool = False,
) -> PlacementGroup:
    """Reserve ``num_bundles`` bundles, packed onto as few nodes as possible (``spread``: each on
    a node of its own).

    Each bundle is ``{"GPU": k, "CPU": k}`` when ``use_gpu`` else ``{"CPU": k}``, ``k =
    bundle_size``; a :class:`~slime.ray.actor_group.RayActorGroup` runs ``k`` actors in each (one
    unit each).  One bundle per actor (``k = 1``, PACK) is the one-node layout.  Over ``N`` nodes
    the trainers take one bundle of ``k = G`` per node with Ray's STRICT_SPREAD, which is what
    guarantees every node exactly G ranks: a PACK group of ``N x G`` one-unit bundles may put
    them all on one node that happens to be big enough (always so with logical CPUs), and
    Ray has no per-node count for single bundles (``node:<ip>`` resources cannot tell apart
    nodes that share an IP).  ``flag`` names the option the user set the count with, for the error.

    Raises UserError at once when the cluster's total resources (or, spread, its nodes) are too
    small, and after ``timeout_s`` when they exist but are held by someone else.
    """
    kind = "GPU" if use_gpu else "CPU"
    what = f"{num_bundles} {kind} bundles" if bundle_size == 1 else f"{num_bundles} bundles of {bundle_size} {kind}s"
    asked = f"{flag} {num_bundles} needs {what}" + (" on as many nodes" if spread else "")
    shortfall = _shortfall(num_bundles, use_gpu, ray.cluster_resources(), bundle_size)
    if not shortfall and spread:
        shortfall = _nodes_short(num_bundles, use_gpu, bundle_size)
    if shortfall:
        raise UserError(f"{asked} but the Ray cluster has {shortfall}; lower {flag} or add resources")

    group = placement_group([_bundle(use_gpu, bundle_size) for _ in range(num_bundles)],
                            strategy="STRICT_SPREAD" if spread else "PACK")
    if not group.wait(timeout_seconds=timeout_s):
        remove_placement_group(group)
        free = _shortfall(num_bundles, use_gpu, ray.available_resources(), bundle_size)
        raise UserError(
            f"{asked} but the Ray cluster has only {free or 'fewer'} free after {timeout_s:g} s "
            f"(others hold the rest); lower {flag} or free resources"
        )
    return group
