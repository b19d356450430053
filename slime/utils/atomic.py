"""The one way this project writes files: a temporary name, fsync, rename.

A reader (or a run resumed after ``kill -9`` or a power loss) sees either the old content or
the complete new content, never a partial file.  The sequence per file is

    write(<dir>/.<name>.tmp-<pid>-<n>) -> fsync(file) -> rename to <dir>/<name> -> fsync(<dir>)

(the rename is atomic on POSIX filesystems; the directory fsync makes it durable).  Whole
directories (checkpoints, adapters, HF exports, prepared models) are filled under a sibling
staging name and swapped in the same way: see :func:`write_dir_atomically`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

_counter = itertools.count()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's entry and data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (deepest first), ``root`` last."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def temporary_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A hidden name next to ``path``, unique to this process and call: ``.<name>.<tag>-<pid>-<n>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{next(_counter)}")


def write_file_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to produce the file under a temporary name, then make it ``path``.

    ``write`` receives the temporary path and must create the file there (e.g.
    ``safetensors.torch.save_file(tensors, str(tmp))``).  On any error the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomically(path: str | os.PathLike, value: Any, *, indent: int = 2) -> Path:
    """``value`` as JSON with sorted keys and a final newline."""
    return write_text_atomically(path, json.dumps(value, indent=indent, sort_keys=True) + "\n")


def write_dir_atomically(out_dir: str | os.PathLike, fill: Callable[[Path], None], *,
                         keep_other_files: bool = False) -> Path:
    """Call ``fill(staging)`` on a fresh sibling directory, then publish it as ``out_dir``.

    Default: ``out_dir`` is replaced as a whole (an existing one is renamed aside, the staging
    directory renamed in, the old one deleted), so a reader sees the old or the new directory.
    ``keep_other_files=True``: an existing ``out_dir`` keeps its other files (e.g. a tokenizer
    next to exported weights) and each staged file is renamed over its namesake.  A failure
    removes the staging directory and leaves ``out_dir`` untouched.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_sibling(out_dir)
    staging.mkdir()
    try:
        fill(staging)
        _fsync_tree(staging)
        if keep_other_files and out_dir.is_dir():
            for item in sorted(staging.iterdir()):
                os.replace(item, out_dir / item.name)
            fsync_path(out_dir)
        else:
            _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_path(out_dir.parent)
    return out_dir


def _swap_in(staging: Path, out_dir: Path) -> None:
    """``staging`` becomes ``out_dir``; an existing ``out_dir`` is removed only after the swap."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    retired = temporary_sibling(out_dir, "old")
    os.replace(out_dir, retired)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(retired, out_dir)  # the old directory goes back to its name
        raise
    shutil.rmtree(retired, ignore_errors=True)
