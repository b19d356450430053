"""The Ray layer on a real local cluster: placement groups, an actor group doing a
gloo all-reduce, error unwrapping, and a cluster lifecycle that leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import ray
import torch
import torch.distributed as dist
from ray.exceptions import RayActorError, RayTaskError

from slime.ray.actor_group import RayActorGroup
from slime.ray.cluster import (OWNER_FILE, REPO_ROOT, TEMP_PREFIX, _owner_record, create_placement_group,
                                ray_cluster, reap_stale_temp_dirs)
from slime.utils.errors import UserError

CLUSTER_CPUS = 4  # logical: more than this machine's 2 cores, on purpose
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH")

# This test module is not importable inside Ray workers: ship its classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class GlooWorker:
    """A tiny actor that joins a gloo process group in its constructor."""

    def __init__(self, scale: float, *, rank: int, world_size: int) -> None:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        self.rank, self.world_size, self.scale = rank, world_size, scale

    def all_reduce(self) -> float:
        value = torch.tensor([self.scale * (self.rank + 1)])
        dist.all_reduce(value)
        return value.item()

    def identity(self) -> dict:
        env = {key: os.environ.get(key) for key in ENV_KEYS}
        return {"rank": self.rank, "world_size": self.world_size, "dist_rank": dist.get_rank(), "env": env}

    def fail_on_rank(self, rank: int, message: str) -> int:
        if self.rank == rank:
            raise UserError(message)
        # The other ranks enter a collective that the failing rank never joins.
        dist.barrier()
        return self.rank

    def bug(self) -> None:
        raise ValueError("not a user error")


class PlainWorker:
    """An actor outside any torch.distributed world: constructed without rank or world_size."""

    def __init__(self, name: str, *, suffix: str = "") -> None:
        self.name = name + suffix

    def identity(self) -> dict:
        return {"name": self.name, "env": {key: os.environ.get(key) for key in (*ENV_KEYS, "SLIME_TEST_VAR")}}


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster(num_cpus=CLUSTER_CPUS):
        yield


@pytest.fixture(scope="module")
def gloo_group(cluster):
    group = create_placement_group(2, use_gpu=False)
    actors = RayActorGroup(GlooWorker, 2, group, use_gpu=False, args=(10.0,))
    yield actors
    actors.kill()
    ray.util.remove_placement_group(group)


def test_cluster_has_the_logical_cpus_asked(cluster):
    assert ray.cluster_resources()["CPU"] == CLUSTER_CPUS


def test_gloo_all_reduce_across_two_actors(gloo_group):
    assert gloo_group.call("all_reduce") == [30.0, 30.0]  # 10 * (1 + 2) on every rank


def test_actors_get_rank_world_size_and_rendezvous_env(gloo_group):
    first, second = gloo_group.call("identity")
    assert [first["rank"], second["rank"]] == [first["dist_rank"], second["dist_rank"]] == [0, 1]
    assert first["world_size"] == second["world_size"] == 2
    assert first["env"]["MASTER_PORT"] == second["env"]["MASTER_PORT"]
    assert [first["env"]["RANK"], second["env"]["RANK"]] == ["0", "1"]
    assert str(REPO_ROOT) in first["env"]["PYTHONPATH"].split(os.pathsep)
    assert gloo_group.call_rank0("identity")["rank"] == 0


def test_independent_actors_get_no_rank_and_no_rendezvous_env(cluster):
    group = create_placement_group(1, use_gpu=False)
    actors = RayActorGroup(PlainWorker, 1, group, use_gpu=False, args=("engine",), kwargs={"suffix": "-0"},
                           env_vars={"SLIME_TEST_VAR": "on"}, distributed=False)
    try:
        seen = actors.call_rank0("identity")
        assert seen["name"] == "engine-0"
        assert seen["env"]["SLIME_TEST_VAR"] == "on"
        assert [seen["env"][key] for key in ENV_KEYS[:5]] == [None] * 5  # RANK ... MASTER_PORT
        assert str(REPO_ROOT) in seen["env"]["PYTHONPATH"].split(os.pathsep)
    finally:
        actors.kill()
        ray.util.remove_placement_group(group)


def test_user_error_surfaces_unwrapped_even_while_other_ranks_wait(cluster):
    # A group of its own: rank 0 stays stuck in the barrier until kill() ends it.
    group = create_placement_group(2, use_gpu=False)
    actors = RayActorGroup(GlooWorker, 2, group, use_gpu=False, args=(1.0,))
    stuck = actors.actors[0]
    try:
        start = time.monotonic()
        with pytest.raises(UserError) as exc:
            actors.call("fail_on_rank", 1, "--rollout-batch-size 3 must divide 8")
        assert type(exc.value) is UserError
        assert str(exc.value) == "--rollout-batch-size 3 must divide 8"
        assert time.monotonic() - start < 30, "must not wait for rank 0's collective to time out"
        actors.kill()
        assert len(actors) == 0
        with pytest.raises(RayActorError):
            ray.get(stuck.identity.remote(), timeout=30)
    finally:
        actors.kill()
        ray.util.remove_placement_group(group)


def test_other_errors_keep_the_remote_traceback(gloo_group):
    with pytest.raises(RayTaskError) as exc:
        gloo_group.call_rank0("bug")
    assert isinstance(exc.value, ValueError)
    assert "not a user error" in str(exc.value)


def test_placement_beyond_the_cluster_is_a_user_error(cluster):
    with pytest.raises(UserError) as exc:
        create_placement_group(CLUSTER_CPUS + 1, use_gpu=False)
    assert str(exc.value).startswith(
        f"--actor-num-gpus-per-node {CLUSTER_CPUS + 1} needs {CLUSTER_CPUS + 1} CPU bundles "
        f"but the Ray cluster has {CLUSTER_CPUS} CPUs"
    )
    with pytest.raises(UserError, match="needs 1 GPU bundles but the Ray cluster has 0 GPUs"):
        create_placement_group(1, use_gpu=True)


def test_placement_of_busy_resources_times_out_with_a_user_error(gloo_group):
    # gloo_group holds 2 of the 4 CPUs: 3 bundles exist in total but not free.
    with pytest.raises(UserError, match="--rollout-num-gpus 3 needs 3 CPU bundles .* free after 1 s"):
        create_placement_group(3, use_gpu=False, flag="--rollout-num-gpus", timeout_s=1)
    # The failed attempt released its partial reservation: the 2 free CPUs can be placed.
    group = create_placement_group(2, use_gpu=False, timeout_s=5)
    ray.util.remove_placement_group(group)


_LIFECYCLE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, tempfile
    import ray
    from slime.ray.cluster import ray_cluster

    seen = {}
    try:
        with ray_cluster(num_cpus=3):
            seen["cpus"] = ray.cluster_resources()["CPU"]
            seen["auth_mode"] = os.environ.get("RAY_AUTH_MODE")
            seen["temp_dirs"] = os.listdir(tempfile.gettempdir())
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        seen["interrupted"] = True
    seen["initialized_after"] = ray.is_initialized()
    seen["auth_mode_after"] = os.environ.get("RAY_AUTH_MODE")
    print(json.dumps(seen))
    """
)


def test_local_cluster_leaves_nothing_behind_after_an_interrupt():
    # A fresh process with an empty HOME and TMPDIR shows every file Ray writes.
    # The TMPDIR stays short: Ray's unix socket paths must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="h") as home, tempfile.TemporaryDirectory(prefix="t") as tmp:
        env = {**os.environ, "HOME": home, "TMPDIR": tmp, "PYTHONPATH": str(REPO_ROOT)}
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_MODE", None)
        result = subprocess.run(
            [sys.executable, "-c", _LIFECYCLE_SCRIPT], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout.strip().splitlines()[-1])
        assert seen["cpus"] == 3 and seen["interrupted"]
        assert seen["auth_mode"] == "disabled" and seen["auth_mode_after"] is None
        assert not seen["initialized_after"]
        assert [name[: len("slime-ray-")] for name in seen["temp_dirs"]] == ["slime-ray-"]
        assert os.listdir(tmp) == [], "the private Ray temp dir must be removed"
        assert os.listdir(home) == [], "nothing may be written under HOME"
        ray_dir = os.path.join(tmp, seen["temp_dirs"][0])
        assert not _processes_mentioning(ray_dir), "Ray daemons must be gone"


def _processes_mentioning(path: str, wait_s: float = 5.0) -> list[int]:
    """PIDs whose command line mentions ``path`` or that hold a file under it open (Ray renames
    its agents and workers, ``ray::IDLE``), after letting exiting daemons finish."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = []
        for proc in psutil.process_iter(["pid", "cmdline", "open_files", "status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            files = [f.path for f in proc.info["open_files"] or ()]
            if any(path in arg for arg in [*(proc.info["cmdline"] or ()), *files]):
                pids.append(proc.info["pid"])
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)


# --- Runs that were killed: their temp dirs and leftover Ray processes ---------------------------

def _fake_run_dir(root: Path, name: str, owner: dict | None) -> Path:
    path = root / f"{TEMP_PREFIX}{name}"
    (path / "session_x" / "logs").mkdir(parents=True)
    (path / "session_x" / "logs" / "raylet.out").write_text("log\n")
    if owner is not None:
        (path / OWNER_FILE).write_text(json.dumps(owner))
    return path


def _dead_pid_record() -> dict:
    """The owner record of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    record = _owner_record(child.pid)
    child.kill()
    child.wait()
    return record


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_reap_removes_only_dirs_of_dead_drivers_and_kills_their_processes(tmp_path: Path):
    live = _fake_run_dir(tmp_path, "live", _owner_record(os.getpid()))
    reused = _fake_run_dir(tmp_path, "reused", {**_owner_record(os.getpid()), "start_time": 1})  # pid reused
    dead = _fake_run_dir(tmp_path, "dead", _dead_pid_record())
    unowned_new = _fake_run_dir(tmp_path, "unownednew", None)  # a run about to write its record
    unowned_old = _fake_run_dir(tmp_path, "unownedold", None)
    _age(unowned_old, 3600)
    unowned_used = _fake_run_dir(tmp_path, "unownedused", None)
    _age(unowned_used, 3600)
    other = tmp_path / "not-ours"
    other.mkdir()
    # Leftovers of the dead run, "Ray processes" (a script under a ray/ directory): one names the
    # dir on its command line, one (as Ray's renamed agents) only holds a log file open.
    script = tmp_path / "site" / "ray" / "agent.py"
    script.parent.mkdir(parents=True)
    script.write_text("import sys, time\nf = open(sys.argv[1]) if sys.argv[1] else None\nprint(flush=True)\n"
                      "time.sleep(60)\n")
    log = str(dead / "session_x" / "logs" / "raylet.out")
    children = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE)
                for args in ([str(script), "", f"--temp-dir={dead}"], [str(script), log],
                             [str(script), "", str(unowned_used)],
                             ["-c", "import sys, time; f = open(sys.argv[1]); print(flush=True); time.sleep(60)", log])]
    by_cmdline, by_file, user_of_unowned, not_ray = children
    try:
        for child in children:
            child.stdout.readline()  # started, its file open
        removed = reap_stale_temp_dirs(tmp_path)
        assert sorted(removed) == sorted([reused, dead, unowned_old])
        assert by_cmdline.wait(timeout=10) == -9 and by_file.wait(timeout=10) == -9
        assert user_of_unowned.poll() is None, "a process of a dir without owner is never killed"
        assert not_ray.poll() is None, "a program that is not Ray's (a tail -f of a log) is never killed"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            p.name for p in (live, unowned_new, unowned_used, other, script.parents[1]))
        assert (live / "session_x" / "logs" / "raylet.out").is_file()
    finally:
        for child in children:
            child.kill()
            child.wait()


_KILLED_DRIVER_SCRIPT = textwrap.dedent(
    """
    import os, signal
    from slime.ray.cluster import ray_cluster

    with ray_cluster(num_cpus=1):
        os.kill(os.getpid(), signal.SIGKILL)
    """
)

_NEXT_RUN_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, tempfile, time
    from slime.ray.cluster import ray_cluster

    with ray_cluster(num_cpus=1):
        print(json.dumps(sorted(os.listdir(tempfile.gettempdir()))), flush=True)
        if sys.argv[1] == "wait":
            time.sleep(120)
    """
)


def _run_env(home: str, tmp: str) -> dict:
    env = {**os.environ, "HOME": home, "TMPDIR": tmp, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    return env


def test_next_run_removes_a_killed_runs_dir_and_processes_and_spares_a_live_one():
    with tempfile.TemporaryDirectory(prefix="h") as home, tempfile.TemporaryDirectory(prefix="t") as tmp:
        env = _run_env(home, tmp)
        killed = subprocess.run([sys.executable, "-c", _KILLED_DRIVER_SCRIPT], env=env, capture_output=True,
                                text=True, timeout=120)
        assert killed.returncode == -9, killed.stderr
        (stale,) = (os.path.join(tmp, name) for name in os.listdir(tmp))
        assert _processes_mentioning(stale, wait_s=0), "Ray's agents outlive a killed driver"
        live = _fake_run_dir(Path(tmp), "live", _owner_record(os.getpid()))

        result = subprocess.run([sys.executable, "-c", _NEXT_RUN_SCRIPT, "exit"], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"removed {stale}, the Ray temp dir of a run that was killed" in result.stderr
        inside = json.loads(result.stdout.strip().splitlines()[-1])
        assert os.path.basename(stale) not in inside and live.name in inside and len(inside) == 2
        assert not _processes_mentioning(stale, wait_s=0), "the killed run's Ray processes must be gone"
        assert os.listdir(tmp) == [live.name], "a normal exit removes the run's own dir; a live run's stays"
        assert (live / "session_x" / "logs" / "raylet.out").is_file()


def test_sigterm_shuts_ray_down_and_removes_the_temp_dir():
    with tempfile.TemporaryDirectory(prefix="h") as home, tempfile.TemporaryDirectory(prefix="t") as tmp:
        driver = subprocess.Popen([sys.executable, "-c", _NEXT_RUN_SCRIPT, "wait"], env=_run_env(home, tmp),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            (name,) = json.loads(driver.stdout.readline())
            ray_dir = os.path.join(tmp, name)
            assert _processes_mentioning(ray_dir, wait_s=0)
            driver.terminate()
            assert driver.wait(timeout=60) == 128 + signal.SIGTERM, driver.stderr.read()
        finally:
            driver.kill()
            driver.wait()
        assert os.listdir(tmp) == []
        assert not _processes_mentioning(ray_dir), "Ray daemons must be gone"
