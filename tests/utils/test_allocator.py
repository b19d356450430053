"""Choosing the malloc of spawned processes: env vars, flag validation, and the effect in a child."""

import subprocess
import sys

import pytest

from slime.utils import allocator
from slime.utils.arguments import parse_args
from slime.utils.errors import UserError


def test_system_means_no_preload():
    assert allocator.allocator_env("system") == {}


def test_auto_without_library_is_glibc(monkeypatch, tmp_path):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator.allocator_env("auto") == {}
    with pytest.raises(FileNotFoundError, match=allocator.LIBRARY):
        allocator.allocator_env("tcmalloc")


def test_explicit_path_wins_and_existing_preload_is_kept(monkeypatch, tmp_path):
    lib = tmp_path / allocator.LIBRARY
    lib.write_bytes(b"")
    monkeypatch.setenv(allocator.PATH_VAR, str(lib))
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    assert allocator.find_tcmalloc() == lib
    assert allocator.allocator_env("auto") == {"LD_PRELOAD": f"{lib}:/opt/other.so"}


def test_flag_error_names_flag_and_fix(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    with pytest.raises(UserError, match=r"--allocator tcmalloc: .*make setup"):
        parse_args(["--allocator", "tcmalloc"])
    with pytest.raises(SystemExit):
        parse_args(["--allocator", "jemalloc"])


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="tcmalloc not installed (make setup fetches it)")
def test_child_started_with_the_env_runs_on_tcmalloc():
    code = "from slime.utils.allocator import active_allocator; import torch; print(active_allocator())"
    env = {**allocator.allocator_env("auto"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert out.stdout.strip() == "tcmalloc"
    plain = subprocess.run([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                           text=True, check=True, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert plain.stdout.strip() == "glibc"
