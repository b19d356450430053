"""A dead or hung actor ends the run with one line: what failed, the newest checkpoint, the resume command."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import ray
from ray.exceptions import RayTaskError

from slime.ray.actor_group import ActorTimeoutError, RayActorGroup, get_all
from slime.ray.cluster import create_placement_group, ray_cluster
from slime.ray.faults import (ActorFailure, actor_failures_end_the_run, checkpoint_and_command, failure_line,
                              resume_command, short_cause)
from slime.utils.errors import UserError

# This test module is not importable inside Ray workers: ship its classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TRAIN = ["python", "train.py", "--hf-checkpoint", "m", "--num-rollout", "9"]


def _checkpoint(save: Path, iteration: int) -> None:
    """The committed shape of a checkpoint (see slime/backends/megatron_utils/checkpoint.py)."""
    iter_dir = save / f"iter_{iteration:07d}"
    iter_dir.mkdir(parents=True)
    (iter_dir / "checkpoint.json").write_text("{}")
    (save / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")


def test_resume_command_adds_load_to_the_original_argv():
    assert resume_command([*TRAIN, "--save", "out dir"], "out dir") == shlex.join([*TRAIN, "--save", "out dir",
                                                                                     "--load", "out dir"])


@pytest.mark.parametrize("given", [["--load", "old"], ["--load=old"]])
def test_resume_command_replaces_an_existing_load(given):
    argv = [*TRAIN[:2], *given, *TRAIN[2:], "--save", "s"]
    assert resume_command(argv, "s") == shlex.join([*TRAIN[:2], "--load", "s", *TRAIN[2:], "--save", "s"])


def test_found_checkpoint_names_its_directory_and_the_load_command(tmp_path):
    save = tmp_path / "save"
    _checkpoint(save, 2)
    text = checkpoint_and_command(str(save), [*TRAIN, "--save", str(save)])
    assert text == (f"newest checkpoint: {save}/iter_0000002 (rollout 2); resume with: "
                    f"{shlex.join([*TRAIN, '--save', str(save), '--load', str(save)])}")


def test_a_staged_save_is_not_a_checkpoint(tmp_path):
    """Only what latest_checkpointed_iteration.txt names counts: a half-written .iter_*.tmp does not."""
    save = tmp_path / "save"
    _checkpoint(save, 1)
    (save / ".iter_0000002.tmp").mkdir()
    assert checkpoint_and_command(str(save), [*TRAIN, "--save", str(save)]).startswith(
        f"newest checkpoint: {save}/iter_0000001 (rollout 1); ")


def test_no_checkpoint_yet_restarts_with_the_original_command(tmp_path):
    save = tmp_path / "save"
    argv = [*TRAIN, "--save", str(save), "--load", "earlier"]
    assert checkpoint_and_command(str(save), argv) == (f"no checkpoint under --save {save} yet; start again with: "
                                                       f"{shlex.join(argv)}")
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("garbled")
    assert checkpoint_and_command(str(save), argv).startswith(f"no checkpoint under --save {save} yet; ")


def test_no_save_flag_restarts_with_the_original_command():
    assert checkpoint_and_command(None, TRAIN) == f"no checkpoint (no --save); start again with: {shlex.join(TRAIN)}"


def test_failure_line_is_one_line_and_writes_the_details_to_the_log_dir(tmp_path):
    args = argparse.Namespace(save=None, log_dir=str(tmp_path / "logs"))
    error = RuntimeError("remote\ntraceback")
    line, log = failure_line("the rollout engine (pid 7) died (SYSTEM_ERROR)", args, error, argv=TRAIN)
    assert line == (f"the rollout engine (pid 7) died (SYSTEM_ERROR); no checkpoint (no --save); start again with: "
                    f"{shlex.join(TRAIN)}; details: {log}")
    assert log == tmp_path / "logs" / "actor_failure.log"
    assert "remote\ntraceback" in log.read_text() and log.read_text().startswith(line)


def test_failure_line_without_log_dir_uses_a_temp_file():
    args = argparse.Namespace(save=None, log_dir=None)
    line, log = failure_line("x died", args, RuntimeError("boom"), argv=TRAIN)
    try:
        assert line.endswith(f"; details: {log}") and "boom" in log.read_text()
    finally:
        log.unlink()


def test_actor_failure_is_a_user_error_with_its_own_exit_status():
    assert issubclass(ActorFailure, UserError) and ActorFailure.exit_status == 3


RAY_DEATH = ("The actor died unexpectedly before finishing this task.\n\tclass_name: HFRolloutEngine\n\tactor_id: ab\n"
             "\tpid: 32255\n\tnamespace: n\n\tip: 192.0.2.2\nThe actor is dead because its worker process has died. "
             "Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error "
             "code 2. End of file. Some common causes include: (1) the process was killed by the OOM killer")


@pytest.mark.parametrize("message, short", [
    (RAY_DEATH, "SYSTEM_ERROR: Worker unexpectedly exits with a connection error code 2. End of file."),
    ("The actor died unexpectedly before finishing this task.\n\tclass_name: X\nThe actor is dead because it was "
     "killed by `ray.kill`.", "The actor is dead because it was killed by `ray.kill`."),
    ("The actor died because of an error raised in its creation task, ray::X.__init__()\nTraceback ...",
     "The actor died because of an error raised in its creation task, ray::X.__init__()"),
])
def test_short_cause_keeps_what_ray_says_in_one_line(message, short):
    assert short_cause(message) == short

def test_an_unwritable_log_dir_falls_back_to_a_temp_file(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    line, log = failure_line("x died", argparse.Namespace(save=None, log_dir=str(blocker)), RuntimeError("boom"),
                             argv=TRAIN)
    try:
        assert log.parent != blocker and line.endswith(f"; details: {log}") and log.read_text().startswith(line)
    finally:
        log.unlink()


# --------------------------------------------------------------------------- on a real local cluster

class Rank:
    """One rank of a two-process world (gloo joined on demand: torch is slow to import)."""

    def __init__(self, *, rank: int, world_size: int) -> None:
        self.rank = rank

    def join(self) -> None:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(seconds=20))

    def pid(self) -> int:
        return os.getpid()

    def sleep_on(self, rank: int, seconds: float) -> int:
        if self.rank == rank:
            time.sleep(seconds)
        return self.rank

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def bug(self) -> None:
        raise ValueError("not an actor failure")


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster(num_cpus=4):
        yield


@pytest.fixture
def ranks(cluster):
    """Two gloo ranks named "training" with their pids, under a 2 s deadline per call."""
    pg = create_placement_group(2, use_gpu=False)
    group = RayActorGroup(Rank, 2, pg, use_gpu=False, name="training")
    group.pids = group.call("pid")  # the first call waits for start-up too: no deadline yet
    group.timeout_s = 2
    yield group
    group.kill()
    ray.util.remove_placement_group(pg)


def _run_args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(save=None, log_dir=str(tmp_path), actor_timeout=2.0)


def test_a_call_past_its_deadline_names_the_late_rank(ranks, tmp_path):
    start = time.monotonic()
    with pytest.raises(ActorTimeoutError) as info:
        ranks.call("sleep_on", 1, 60)
    assert time.monotonic() - start < 10
    assert info.value.who == [f"training rank 1 (pid {ranks.pids[1]})"]
    assert str(info.value) == f"training rank 1 (pid {ranks.pids[1]}) has not returned from sleep_on after 2 s"
    with pytest.raises(ActorFailure) as failure:
        with actor_failures_end_the_run(_run_args(tmp_path), argv=TRAIN):
            ranks.call("sleep_on", 0, 60)
    line = str(failure.value)  # rank 1 is still in its first sleep: both are late
    assert line == (f"training rank 0 (pid {ranks.pids[0]}), training rank 1 (pid {ranks.pids[1]}) have not "
                    "returned from sleep_on after 2 s "
                    f"(--actor-timeout 2); no checkpoint (no --save); start again with: {shlex.join(TRAIN)}; "
                    f"details: {tmp_path / 'actor_failure.log'}")


def test_get_all_without_a_deadline_waits(ranks):
    assert get_all([ranks.actors[1].sleep_on.remote(1, 3)], timeout_s=0) == [1]


def test_a_killed_rank_is_named_even_when_its_peer_fails_first(ranks, tmp_path):
    """Rank 1 is killed; only rank 0's barrier is waited on and fails (gloo lost its peer): the
    report names the dead rank, found by probing every actor, with Ray's exit cause."""
    get_all(ranks.async_call("join"))  # no deadline: importing torch takes a while
    os.kill(ranks.pids[1], signal.SIGKILL)
    with pytest.raises(ActorFailure) as failure:
        with actor_failures_end_the_run(_run_args(tmp_path), argv=TRAIN):
            get_all([ranks.actors[0].barrier.remote()])
    line = str(failure.value)
    assert line.startswith(f"training rank 1 (pid {ranks.pids[1]}) died (SYSTEM_ERROR: "), line
    assert "\n" not in line and "no checkpoint (no --save)" in line
    log = (tmp_path / "actor_failure.log").read_text()
    assert "Traceback" in log and "RayTaskError" in log, log  # what was caught: rank 0's error, not the death


def test_a_dead_engine_is_named_by_the_error_itself(cluster, tmp_path, monkeypatch):
    pg = create_placement_group(1, use_gpu=False)
    engine = RayActorGroup(Rank, 1, pg, use_gpu=False, name="the rollout engine", distributed=False, timeout_s=60,
                           kwargs={"rank": 0, "world_size": 1})
    try:
        engine.pids = engine.call("pid")
        monkeypatch.setattr("slime.ray.faults._probe_dead", lambda: pytest.fail("probed: the error names the actor"))
        call = engine.actors[0].sleep_on.remote(0, 60)
        os.kill(engine.pids[0], signal.SIGKILL)
        with pytest.raises(ActorFailure) as failure:
            with actor_failures_end_the_run(_run_args(tmp_path), argv=TRAIN):
                engine.get([call], "generate")
        assert str(failure.value).startswith(f"the rollout engine (pid {engine.pids[0]}) died (SYSTEM_ERROR: ")
    finally:
        engine.kill()
        ray.util.remove_placement_group(pg)


def test_other_ray_errors_keep_their_traceback(ranks, tmp_path):
    with pytest.raises(RayTaskError, match="not an actor failure"):
        with actor_failures_end_the_run(_run_args(tmp_path), argv=TRAIN):
            ranks.call("bug")




def test_a_first_call_past_its_deadline_says_it_includes_start_up(cluster):
    pg = create_placement_group(1, use_gpu=False)
    group = RayActorGroup(Rank, 1, pg, use_gpu=False, name="the rollout engine", distributed=False, timeout_s=0.01,
                          kwargs={"rank": 0, "world_size": 1})
    try:
        with pytest.raises(ActorTimeoutError, match=r"^the rollout engine has not returned from pid \(its first "
                                                     r"call, so including its start-up\) after 0\.01 s$"):
            group.call("pid")
    finally:
        group.kill()
        ray.util.remove_placement_group(pg)

