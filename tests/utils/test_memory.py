"""PeakMemoryTracker and process_peak_rss against real processes that allocate real memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from slime.utils.memory import PeakMemoryTracker, process_peak_rss

MB = 1024**2
ALLOC_MB = 300
INTERVAL_S = 0.05

# Allocates ALLOC_MB of written (so resident) memory, says so, frees it on one stdin
# line, says so, and exits when stdin closes.
_ALLOC_AND_FREE = f"""
import sys
block = b"\\x01" * ({ALLOC_MB} * 1024 * 1024)
print("allocated", flush=True)
sys.stdin.readline()
del block
print("freed", flush=True)
sys.stdin.read()
"""

# Started by a launcher that exits at once, so its parent becomes init: a process
# that is not our descendant, like a Ray actor of a cluster we joined.
_ORPHAN = f"""
import pathlib, sys, time
block = b"\\x01" * ({ALLOC_MB} * 1024 * 1024)
pathlib.Path(sys.argv[1]).write_text("ready")
time.sleep(60)  # killed by the test; never outlives it by more than this
"""
_LAUNCHER = """
import subprocess, sys
proc = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], start_new_session=True,
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)  # the caller reads our output to EOF
print(proc.pid, flush=True)
"""


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def spawn_orphan(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start a non-descendant process holding ALLOC_MB; return its pid once allocated."""
    pids: list[int] = []

    def spawn(*extra_argv: str) -> int:
        ready = tmp_path / f"ready-{len(pids)}"
        out = subprocess.run([sys.executable, "-c", _LAUNCHER, _ORPHAN, str(ready), *extra_argv],
                             capture_output=True, text=True, check=True, timeout=30)
        pid = int(out.stdout)
        pids.append(pid)
        _wait_for(ready.exists)
        return pid

    yield spawn
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_peak_sees_a_child_that_allocates_then_frees() -> None:
    with PeakMemoryTracker(interval_s=INTERVAL_S) as mem:
        baseline = mem.baseline_bytes
        child = subprocess.Popen([sys.executable, "-c", _ALLOC_AND_FREE],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "allocated"
            _wait_for(lambda: mem.peak_bytes >= baseline + (ALLOC_MB - 50) * MB)
            # PSS is sampled less often: hold the block until a PSS sample has seen it too.
            baseline_pss = mem.summary()["baseline_pss_bytes"]
            _wait_for(lambda: mem.peak_pss_bytes >= baseline_pss + (ALLOC_MB - 50) * MB)
            holding = mem.current_bytes()
            hwm_while_holding = process_peak_rss(child.pid)
            child.stdin.write("free\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "freed"
            # The child's peak stays recorded by the kernel after the memory is gone.
            assert process_peak_rss(child.pid) >= ALLOC_MB * MB
            _wait_for(lambda: mem.current_bytes() < holding - (ALLOC_MB - 50) * MB)
        finally:
            child.stdin.close()
            child.wait(timeout=30)
    summary = mem.summary()
    assert hwm_while_holding >= ALLOC_MB * MB
    assert summary["peak_rss_bytes"] == mem.peak_bytes >= baseline + (ALLOC_MB - 50) * MB
    # The per-process peaks bound the sampled peak of the sum from above.
    assert summary["hwm_sum_bytes"] >= summary["peak_rss_bytes"]
    assert summary["processes_seen"] >= 2 and summary["samples"] >= 3
    # PSS splits shared pages, so it never exceeds RSS; the child's private block is in it.
    assert summary["peak_pss_bytes"] is not None
    assert summary["baseline_pss_bytes"] <= summary["baseline_rss_bytes"]
    assert summary["peak_pss_bytes"] <= summary["peak_rss_bytes"]
    assert mem.metrics()["mem/peak_rss_gib"] == pytest.approx(summary["peak_rss_bytes"] / 1024**3)


def test_add_pid_follows_an_unrelated_process(spawn_orphan: Callable[..., int]) -> None:
    with PeakMemoryTracker(interval_s=INTERVAL_S) as mem:
        pid = spawn_orphan()
        assert pid not in {p.pid for p in psutil.Process().children(recursive=True)}
        without = mem.current_bytes()
        assert without < mem.baseline_bytes + 100 * MB  # not counted: not our descendant
        assert mem.add_pid(pid)
        assert mem.current_bytes() >= without + (ALLOC_MB - 50) * MB
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
        # A dead process drops out of the current sum but keeps its place in the peak.
        _wait_for(lambda: mem.current_bytes() < without + 100 * MB)
    assert mem.peak_bytes >= without + (ALLOC_MB - 50) * MB


def test_add_pid_of_an_exited_process_is_refused() -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    tracker = PeakMemoryTracker(start=False)
    assert tracker.add_pid(int(done.stdout)) is False


def test_ray_session_processes_are_matched_by_session_dir(spawn_orphan: Callable[..., int],
                                                          tmp_path: Path) -> None:
    session = tmp_path / "ray" / "session_2026-01-01_00-00-00_000000_1"
    ours = spawn_orphan(f"--session_dir={session}")
    other = spawn_orphan(f"--session_dir={tmp_path / 'ray' / 'session_of_another_run'}")
    with PeakMemoryTracker(interval_s=INTERVAL_S) as mem:
        assert mem.add_ray_cluster_processes(session) == [ours]
        assert mem.add_ray_cluster_processes(session) == []  # already followed
        assert mem.current_bytes() >= mem.baseline_bytes + (ALLOC_MB - 50) * MB
        assert mem.current_bytes() < mem.baseline_bytes + (2 * ALLOC_MB - 50) * MB  # `other` is not counted
    assert other != ours


def test_invalid_interval_is_rejected() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        PeakMemoryTracker(interval_s=0)


@pytest.mark.slow
def test_local_ray_cluster_and_actors_are_counted() -> None:
    import ray

    from slime.ray.cluster import ray_cluster

    with ray_cluster(num_cpus=1), PeakMemoryTracker(interval_s=0.2) as mem:
        @ray.remote
        class Holder:
            def hold(self) -> int:
                self.block = b"\x01" * (ALLOC_MB * MB)
                return os.getpid()

        holder = Holder.remote()
        actor_pid = ray.get(holder.hold.remote())
        # A cluster started by this driver is its child tree: nothing new to add, actor included.
        assert mem.add_ray_cluster_processes() == []
        assert mem.current_bytes() >= mem.baseline_bytes + (ALLOC_MB - 50) * MB
        assert actor_pid in {p.pid for p in psutil.Process().children(recursive=True)}
    assert mem.summary()["max_processes"] >= 4  # driver, gcs_server, raylet, the actor
