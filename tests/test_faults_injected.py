"""Fault injection: the driver, the trainer and the rollout engine die a hard death (SIGKILL, through
``SLIME_FAILPOINT``, :mod:`slime.utils.failpoints`) at seeded points, one per run, each run resuming
from the newest checkpoint the previous one left.  After every death the newest complete checkpoint is
the one expected and verifies (no half-written iteration counts); the stitched metrics equal an
uninterrupted run's exactly; when the chain is over no process is left using the runs' temp dirs."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from slime.backends.megatron_utils.arch import ModelArch
from slime.backends.megatron_utils.checkpoint import (
    LATEST_FILE,
    META_FILE,
    STATE_DIR,
    _verify_files,
    iter_dir_name,
    load_dir_problem,
    newest_checkpoint,
    read_latest_iteration,
)
from slime.ray.cluster import _mentions
from slime.utils.arguments import parse_args
from slime.utils.errors import EXIT_RESUMABLE
from slime.utils.failpoints import ENV, POINTS
from slime.utils.metrics import read_metrics
from tests._support.tiny_rl import make_tiny_rl_checkpoint, write_prompts
from tests.test_train import ROOT, common

SEED = 13
KILLS = 10
KEYS = ("rollout/reward_mean", "train/loss", "train/grad_norm")
SEGMENT_TIMEOUT_S = 300
LINGER_WAIT_S = 20.0


def outcome(point: str, hit: int) -> tuple[int, int, int]:
    """For a run whose ``hit``-th pass through ``point`` kills it: (rollouts it needs ahead of it for
    the hit to come, rows it logs, rollouts it saves).  A rollout is logged, then saved (train.py); the
    engine's first ``apply_update`` is the initial sync, its ``k``-th the sync of rollout ``k - 2``."""
    if point == "driver.after_save":
        return hit, hit, hit
    if point.startswith("trainer.save."):
        return hit, hit, hit - 1  # the row is logged, the save dies
    if point == "engine.apply_update":
        return hit - 1, max(hit - 2, 0), max(hit - 2, 0)
    return hit, hit - 1, hit - 1


def plan(seed: int) -> tuple[list[tuple[str, int]], int]:
    """``KILLS`` seeded (point, hit) pairs, every point at least once, and the number of rollouts that
    lets each hit come (with one rollout left for the last, unkilled run)."""
    rng = random.Random(seed)
    points = [*POINTS, *(rng.choice(POINTS) for _ in range(KILLS - len(POINTS)))]
    rng.shuffle(points)
    chain = [(point, rng.randint(1, 3)) for point in points]
    done, num_rollout = 0, 1
    for point, hit in chain:
        needs, _, saved = outcome(point, hit)
        num_rollout = max(num_rollout, done + needs)
        done += saved
    return chain, max(num_rollout, done + 1)


def start_segment(flags: list, out: Path, env: dict) -> subprocess.Popen:
    """``train.py FLAGS`` started, output to files (a SIGKILLed driver's Ray processes may hold a pipe open)."""
    with open(f"{out}.stdout", "w") as stdout, open(f"{out}.stderr", "w") as stderr:
        return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, flags)], cwd=ROOT, stdout=stdout,
                                stderr=stderr, env={**os.environ, "RAY_AUTH_MODE": "disabled", **env})


def finish_segment(proc: subprocess.Popen, out: Path) -> tuple[int, str, str]:
    """The exit status, stdout and stderr of a :func:`start_segment` run, once it ends."""
    try:
        returncode = proc.wait(timeout=SEGMENT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return returncode, Path(f"{out}.stdout").read_text(), Path(f"{out}.stderr").read_text()


def run_segment(flags: list, out: Path, env: dict) -> tuple[int, str, str]:
    return finish_segment(start_segment(flags, out, env), out)


def check_checkpoints(save: Path, expected: int, arch: ModelArch, args) -> None:
    """The newest complete checkpoint is rollout ``expected`` (-1: none) and loads; every directory that
    looks like a finished iteration is one, each file as its manifest lists it."""
    found = newest_checkpoint(save)
    if expected < 0:
        assert found is None, found
    else:
        assert found == (expected, save / iter_dir_name(expected)), found
        assert read_latest_iteration(save) == expected
        assert load_dir_problem(save, arch, args, world_size=1) is None
        assert (save / "adapter").resolve() == (save / iter_dir_name(expected) / "adapter").resolve()
    for iter_dir in sorted(save.glob("iter_*")):
        assert int(iter_dir.name.split("_")[1]) <= expected, iter_dir
        meta = json.loads((iter_dir / META_FILE).read_text())
        _verify_files(iter_dir, meta["files"], sorted(meta["files"]))  # sizes and sha256


def lingering(root: Path) -> list[str]:
    """This user's processes (this one excepted) whose command line, open files or cwd are under ``root``."""
    paths = tuple(dict.fromkeys((str(root), os.path.realpath(root))))
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            args = Path(f"/proc/{entry.name}/cmdline").read_bytes().decode(errors="replace").split("\0")
            fd_dir = f"/proc/{entry.name}/fd"
            names = [*args, os.readlink(f"/proc/{entry.name}/cwd"),
                     *(os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir))]
        except OSError:  # gone meanwhile
            continue
        if any(_mentions(name, paths) for name in names):
            found.append(f"{entry.name}: {' '.join(args)[:200]}")
    return found


@pytest.fixture
def short_tmpdir():
    """``TMPDIR`` for the runs: Ray puts its sockets under it, whose paths must stay under 108 bytes, too
    few for pytest's tmp_path."""
    root = Path(tempfile.mkdtemp(prefix="slime-fi-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_runs_killed_at_seeded_points_resume_exactly_and_leave_nothing(tmp_path, short_tmpdir, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    start = time.time()
    chain, num_rollout = plan(SEED)
    assert {point for point, _ in chain} == set(POINTS) and len(chain) >= 10
    print(f"seed {SEED}: {num_rollout} rollouts; kills: {', '.join(f'{p}@{h}' for p, h in chain)}")
    ckpt = make_tiny_rl_checkpoint(tmp_path / "model")
    prompts = write_prompts(tmp_path / "train.jsonl", n=64)
    env = {"TMPDIR": str(short_tmpdir)}

    def flags(run: str) -> list:
        return [*common(ckpt, prompts, tmp_path / run), "--use-lora", "--lora-r", 4, "--lr", 1e-2,
                "--num-rollout", num_rollout, "--save", tmp_path / run / "save", "--save-interval", 1]

    # The uninterrupted reference run shares only the model and prompts with the chain: it runs beside
    # the chain's first runs (a run is mostly start-up, which leaves a core idle at times) and is waited
    # for before the last run, so that run's reaping and the final process check are as they always were.
    reference_proc = start_segment(flags("reference"), tmp_path / "reference", env)
    save, metrics = tmp_path / "chain" / "save", tmp_path / "chain" / "logs" / "metrics.jsonl"
    base = flags("chain")
    args = parse_args([str(f) for f in base])
    arch = ModelArch.from_checkpoint(ckpt)
    done = 0  # rollouts saved so far: the next run resumes at this one
    try:
        for i, (point, hit) in enumerate(chain):
            where = f"run {i} ({ENV}={point}@{hit}, resuming at rollout {done})"
            resume = ["--load", save] if newest_checkpoint(save) else []
            rc, out, err = run_segment([*base, *resume], tmp_path / f"run{i}", {**env, ENV: f"{point}@{hit}"})
            needs, logged, saved = outcome(point, hit)
            assert done + needs <= num_rollout, where
            if point.startswith("driver."):
                assert rc == -signal.SIGKILL, f"{where}: exit {rc}\n{err[-3000:]}"
            else:
                assert rc == EXIT_RESUMABLE, f"{where}: exit {rc}\n{err[-3000:]}"
                assert "Traceback" not in err, f"{where}\n{err[-5000:]}"
                last = [line for line in err.splitlines() if line.strip()][-1]
                who = "the rollout engine" if point.startswith("engine.") else "training rank 0"
                assert last.startswith(f"error: {who} (pid "), f"{where}: {last}"
                assert " died (" in last, f"{where}: {last}"
                newest = (f"newest checkpoint: {save / iter_dir_name(done + saved - 1)} (rollout {done + saved - 1})"
                          if done + saved else f"no checkpoint under --save {save} yet")
                assert f"; {newest}; " in last, f"{where}: {last}"
            # It died where it was told to: the rows it logged, the checkpoint it left.
            assert [row["rollout_id"] for row in read_metrics(metrics)] == list(range(done + logged)), where
            check_checkpoints(save, done + saved - 1, arch, args)
            if point.startswith("trainer.save."):  # the half-written iteration is there, under its staging name only
                dying = done + hit - 1
                staging = save / f".{iter_dir_name(dying)}.tmp"
                assert (staging / STATE_DIR / "rank_00000.safetensors").is_file(), where
                assert (staging / META_FILE).is_file() == (point == "trainer.save.unpublished"), where
                assert not (save / iter_dir_name(dying)).exists(), where
                assert (save / LATEST_FILE).exists() == (dying > 0), where
            done += saved
    except BaseException:  # the chain failed: its error is the one to see, and no run may outlive the test
        reference_proc.terminate()  # SIGTERM: ray_cluster removes its Ray processes and temp dir
        try:
            reference_proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            reference_proc.kill()
            reference_proc.wait()
        raise
    rc, out, err = finish_segment(reference_proc, tmp_path / "reference")
    assert rc == 0, out[-2000:] + err[-3000:]
    reference = {row["rollout_id"]: row for row in read_metrics(tmp_path / "reference" / "logs" / "metrics.jsonl")}
    assert sorted(reference) == list(range(num_rollout))

    rc, out, err = run_segment([*base, "--load", save], tmp_path / "last", env)
    assert rc == 0, out[-2000:] + err[-3000:]
    check_checkpoints(save, num_rollout - 1, arch, args)
    stitched = {}
    for row in read_metrics(metrics):
        assert row["rollout_id"] not in stitched, row["rollout_id"]
        stitched[row["rollout_id"]] = row
    assert sorted(stitched) == list(range(num_rollout))
    for rollout_id in range(num_rollout):
        for key in KEYS:
            assert stitched[rollout_id][key] == reference[rollout_id][key], (rollout_id, key)

    # The last run reaped what the killed drivers left (their Ray temp dirs and agents): nothing remains.
    deadline = time.monotonic() + LINGER_WAIT_S
    while (left := lingering(short_tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left
    assert not list(short_tmpdir.glob("slime-ray-*")), list(short_tmpdir.iterdir())
    print(f"fault-injection chain: {time.time() - start:.0f} s")
