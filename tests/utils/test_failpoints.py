"""slime.utils.failpoints: SIGKILL at the K-th hit of the named point, never before, nothing when unset."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from slime.utils.failpoints import ENV, POINTS, parse

ROOT = Path(__file__).resolve().parents[2]

# Hits driver.after_train five times, printing the count before each hit, then a last line.
SCRIPT = """
from slime.utils.failpoints import failpoint
for i in range(1, 6):
    print(i, flush=True)
    failpoint("driver.after_sync")  # another point: never fires
    failpoint("driver.after_train")
print("done", flush=True)
"""


def run(spec: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if spec is not None:
        env[ENV] = spec
    return subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("spec, hit", [("driver.after_train", 1), ("driver.after_train@1", 1),
                                       ("driver.after_train@3", 3)])
def test_the_kth_hit_kills_the_process_not_before(spec, hit):
    proc = run(spec)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    assert proc.stdout.split() == [str(i) for i in range(1, hit + 1)]  # died at hit K, after printing K
    assert proc.stderr == ""  # a hard death: no traceback, no clean-up output


@pytest.mark.parametrize("spec", [None, "", "driver.after_train@6", "engine.generate"])
def test_unset_past_the_last_hit_or_another_point_has_no_effect(spec):
    proc = run(spec)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "2", "3", "4", "5", "done"]


@pytest.mark.parametrize("spec", ["driver.nowhere", "driver.after_train@0", "driver.after_train@x"])
def test_a_bad_spec_is_an_error_naming_it(spec):
    with pytest.raises(ValueError, match="SLIME_FAILPOINT"):
        parse(spec)


def test_every_point_is_placed_in_the_code():
    sources = "".join(p.read_text() for p in [ROOT / "train.py", *ROOT.glob("slime/**/*.py")])
    for name in POINTS:
        assert f'failpoint("{name}")' in sources, name


def test_the_variable_reaches_ray_workers(monkeypatch):
    from slime.ray.cluster import worker_runtime_env

    monkeypatch.delenv(ENV, raising=False)
    assert ENV not in worker_runtime_env()["env_vars"]
    monkeypatch.setenv(ENV, "engine.generate@2")
    assert worker_runtime_env()["env_vars"][ENV] == "engine.generate@2"
