"""slime/utils/atomic.py: temporary sibling -> fsync -> rename -> fsync(dir), for files and directories.

Real files in ``tmp_path``; ``os.fsync`` is wrapped (not replaced) to record which paths were
flushed, read back from ``/proc/self/fd`` (Linux).  ``write_peft_dir`` replacing a directory with
a stale file is covered through the plugin in tests/slime_plugins/lora/test_peft_io.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from slime.utils import atomic
from slime.utils.atomic import (
    temporary_sibling,
    write_dir_atomically,
    write_file_atomically,
    write_json_atomically,
    write_text_atomically,
)


class Boom(Exception):
    pass


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _tree(directory: Path) -> dict[str, str]:
    """Every regular file under ``directory`` (relative path -> text)."""
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The paths ``os.fsync`` is called on, in order (the real fsync still runs)."""
    if not sys.platform.startswith("linux"):
        pytest.fail("this test reads /proc/self/fd and needs Linux")
    calls: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


# ----------------------------------------------------------------------------- files


def test_write_file_atomically_produces_the_file_and_nothing_else(tmp_path):
    target = tmp_path / "data.bin"
    returned = write_file_atomically(target, lambda tmp: tmp.write_bytes(b"\x00payload\xff"))
    assert returned == target
    assert target.read_bytes() == b"\x00payload\xff"
    assert _listing(tmp_path) == ["data.bin"]  # no temporary sibling left behind


def test_write_file_atomically_overwrites_and_accepts_str_paths(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("old")
    write_file_atomically(str(target), lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and _listing(tmp_path) == ["notes.txt"]


def test_the_temporary_is_a_hidden_sibling_in_the_same_directory(tmp_path):
    target = tmp_path / "sub" / "model.safetensors"
    target.parent.mkdir()
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        # the real name holds the previous content until the rename
        assert target.read_text() == str(len(seen)) if seen else not target.exists()
        seen.append(tmp)
        tmp.write_text(str(len(seen)))

    write_file_atomically(target, write)
    write_file_atomically(target, write)
    assert target.read_text() == "2"
    first, second = seen
    for tmp in seen:
        assert tmp.parent == target.parent  # same directory: the rename stays on one filesystem
        assert tmp.name.startswith(".model.safetensors.tmp-")
        assert f"-{os.getpid()}-" in tmp.name
        assert not tmp.exists()
    assert first != second  # unique per call


def test_temporary_sibling_names():
    a = temporary_sibling("/x/y/out", "old")
    b = temporary_sibling(Path("/x/y/out"), "old")
    assert a.parent == b.parent == Path("/x/y")
    assert a.name.startswith(f".out.old-{os.getpid()}-") and a != b


@pytest.mark.parametrize("partial", [True, False], ids=["partial-temporary", "no-temporary"])
def test_a_failing_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, partial):
    target = tmp_path / "state.json"
    target.write_text("old content")

    def write(tmp: Path) -> None:
        if partial:
            tmp.write_text("half of the new con")
        raise Boom("disk full")

    with pytest.raises(Boom, match="disk full"):
        write_file_atomically(target, write)
    assert target.read_text() == "old content"
    assert _listing(tmp_path) == ["state.json"]


def test_a_keyboard_interrupt_in_write_also_cleans_up(tmp_path):
    target = tmp_path / "new.txt"

    def write(tmp: Path) -> None:
        tmp.write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_file_atomically(target, write)
    assert _listing(tmp_path) == []  # neither the target nor the temporary


def test_a_write_that_creates_nothing_fails_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_file_atomically(tmp_path / "never.txt", lambda tmp: None)
    assert _listing(tmp_path) == []


def test_write_text_atomically_is_utf8(tmp_path):
    write_text_atomically(tmp_path / "t.txt", "ünïcode ✓\n")
    assert (tmp_path / "t.txt").read_bytes() == "ünïcode ✓\n".encode("utf-8")


def test_write_json_atomically_sorted_keys_indent_and_final_newline(tmp_path):
    value = {"b": 1, "a": {"d": [1, 2], "c": None}}
    write_json_atomically(tmp_path / "default.json", value)
    assert (tmp_path / "default.json").read_text() == (
        '{\n  "a": {\n    "c": null,\n    "d": [\n      1,\n      2\n    ]\n  },\n  "b": 1\n}\n')
    write_json_atomically(tmp_path / "one.json", {"z": True, "y": "s"}, indent=1)
    assert (tmp_path / "one.json").read_text() == '{\n "y": "s",\n "z": true\n}\n'
    assert json.loads((tmp_path / "default.json").read_text()) == value
    assert _listing(tmp_path) == ["default.json", "one.json"]


def test_fsync_flushes_the_temporary_before_the_rename_then_the_directory(tmp_path, fsynced, monkeypatch):
    tmp_path = tmp_path.resolve()  # /proc/self/fd links are resolved paths
    target = tmp_path / "ckpt.safetensors"
    target.write_text("old")
    content_at_fsync: list[str] = []
    real_fsync = os.fsync  # the recording wrapper

    def checking_fsync(fd):
        content_at_fsync.append(target.read_text())
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", checking_fsync)
    write_file_atomically(target, lambda tmp: tmp.write_text("new"))

    assert len(fsynced) == 2, fsynced
    file_path, dir_path = (Path(p) for p in fsynced)
    assert file_path.parent == tmp_path and file_path.name.startswith(".ckpt.safetensors.tmp-")
    assert dir_path == tmp_path
    assert content_at_fsync == ["old", "new"]  # file flushed before the rename, directory after it


# ----------------------------------------------------------------------------- directories


def _fill(files: dict[str, str]):
    def fill(staging: Path) -> None:
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
    return fill


def _old_dir(parent: Path) -> Path:
    out = parent / "out"
    (out / "nested").mkdir(parents=True)
    (out / "weights.bin").write_text("old weights")
    (out / "tokenizer.json").write_text("tokenizer")
    (out / "nested" / "extra.txt").write_text("old extra")
    return out


def test_write_dir_atomically_creates_a_new_directory_and_its_parents(tmp_path):
    out = tmp_path / "a" / "b" / "adapter"
    assert write_dir_atomically(out, _fill({"x.txt": "1", "sub/y.txt": "2"})) == out
    assert _tree(out) == {"x.txt": "1", "sub/y.txt": "2"}
    assert _listing(out.parent) == ["adapter"]


def test_write_dir_atomically_replaces_a_whole_directory(tmp_path):
    out = _old_dir(tmp_path)
    write_dir_atomically(out, _fill({"weights.bin": "new weights", "config.json": "{}"}))
    assert _tree(out) == {"weights.bin": "new weights", "config.json": "{}"}  # old extra files are gone
    assert _listing(tmp_path) == ["out"]  # no staging or retired directory left


def test_keep_other_files_replaces_only_the_staged_files(tmp_path):
    out = _old_dir(tmp_path)
    write_dir_atomically(out, _fill({"weights.bin": "new weights", "config.json": "{}"}), keep_other_files=True)
    assert _tree(out) == {"weights.bin": "new weights", "config.json": "{}", "tokenizer.json": "tokenizer",
                          "nested/extra.txt": "old extra"}
    assert _listing(tmp_path) == ["out"]


def test_keep_other_files_on_a_new_directory_just_creates_it(tmp_path):
    out = tmp_path / "fresh"
    write_dir_atomically(out, _fill({"config.json": "{}"}), keep_other_files=True)
    assert _tree(out) == {"config.json": "{}"} and _listing(tmp_path) == ["fresh"]


@pytest.mark.parametrize("keep_other_files", [False, True])
def test_a_failing_fill_leaves_the_old_directory_untouched(tmp_path, keep_other_files):
    out = _old_dir(tmp_path)
    before = _tree(out)

    def fill(staging: Path) -> None:
        (staging / "weights.bin").write_text("half")
        raise Boom("conversion failed")

    with pytest.raises(Boom, match="conversion failed"):
        write_dir_atomically(out, fill, keep_other_files=keep_other_files)
    assert _tree(out) == before
    assert _listing(tmp_path) == ["out"]  # the staging directory is gone


def test_a_failing_fill_creates_no_directory(tmp_path):
    def fill(staging: Path) -> None:
        raise Boom

    with pytest.raises(Boom):
        write_dir_atomically(tmp_path / "out", fill)
    assert _listing(tmp_path) == []


def test_fill_sees_an_empty_hidden_staging_sibling(tmp_path):
    out = _old_dir(tmp_path)
    seen: list[Path] = []

    def fill(staging: Path) -> None:
        seen.append(staging)
        assert staging.is_dir() and list(staging.iterdir()) == []
        (staging / "f").write_text("new")

    write_dir_atomically(out, fill)
    (staging,) = seen
    assert staging.parent == tmp_path and staging.name.startswith(".out.tmp-") and not staging.exists()


def test_write_dir_atomically_fsyncs_every_file_and_directory(tmp_path, fsynced):
    tmp_path = tmp_path.resolve()
    out = _old_dir(tmp_path)
    staged: list[Path] = []

    def fill(staging: Path) -> None:
        staged.append(staging)
        _fill({"a.txt": "a", "sub/b.txt": "b"})(staging)

    write_dir_atomically(out, fill)
    (staging,) = staged
    flushed = [Path(p) for p in fsynced]
    for path in (staging / "a.txt", staging / "sub" / "b.txt", staging / "sub", staging, tmp_path):
        assert path in flushed, (path, flushed)
    # contents before their directory, the published directory's parent last
    assert flushed.index(staging / "sub" / "b.txt") < flushed.index(staging / "sub") < flushed.index(staging)
    assert flushed[-1] == tmp_path


def test_keep_other_files_fsyncs_the_updated_directory(tmp_path, fsynced):
    tmp_path = tmp_path.resolve()
    out = _old_dir(tmp_path)
    staged: list[Path] = []

    def fill(staging: Path) -> None:
        staged.append(staging)
        (staging / "weights.bin").write_text("new")

    write_dir_atomically(out, fill, keep_other_files=True)
    flushed = [Path(p) for p in fsynced]
    assert flushed == [staged[0] / "weights.bin", staged[0], out, tmp_path]


def test_a_failing_swap_keeps_the_old_directory_at_its_name(tmp_path, monkeypatch):
    """The docstring: 'A failure removes the staging directory and leaves out_dir untouched.'

    The whole-directory swap is two renames (out -> retired, staging -> out).  If the second one
    fails (e.g. ENOTEMPTY because a concurrent writer published ``out`` in between, or EIO),
    ``out`` must not vanish with the old content left under a hidden ``.out.old-*`` name.
    """
    out = _old_dir(tmp_path)
    before = _tree(out)
    real_replace = os.replace

    def failing_second_rename(src, dst):
        if Path(src).name.startswith(".out.tmp-") and Path(dst) == out:
            raise OSError(39, "Directory not empty")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_second_rename)
    with pytest.raises(OSError):
        write_dir_atomically(out, _fill({"weights.bin": "new"}))
    monkeypatch.undo()
    assert out.is_dir() and _tree(out) == before, _listing(tmp_path)
    assert _listing(tmp_path) == ["out"]
