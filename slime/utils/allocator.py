"""Which ``malloc`` the training and rollout processes run with.

On the CPU every activation is a ``malloc``. glibc's allocator serves the pattern of a training
step badly: it raises its mmap threshold after the first large free, so activations land on the
heap, freed holes there are not reused across micro-batches and the resident set keeps growing;
forcing mmap instead returns memory but page-faults every buffer back in (2x slower steps here).
tcmalloc keeps size-class free lists per thread and reuses them, so memory stays bounded *and*
warm. Measured on this machine kind, SmolLM2-135M shape, 8 x 256 tokens, micro-batch 1
(``python benchmarks/lora_vs_full.py [--allocator system]``, 2026-11-28; glibc: two runs):

============  ======================  ======================
allocator      LoRA r=16: RSS, s/step   full: RSS, s/step
============  ======================  ======================
glibc          1.79-1.82 GiB, 8.4-8.5   3.38 GiB, 10.5-12.0
tcmalloc       1.30 GiB, 6.8            3.00 GiB, 8.9
============  ======================  ======================

PyTorch's own CPU launcher (``torch.backends.xeon.run_cpu``) preloads tcmalloc/jemalloc for the
same reason. A library chosen at run time can only take effect in a process that starts with
``LD_PRELOAD`` set, so this module hands out environment variables for the processes we spawn
(Ray actors, benchmark children) rather than switching allocators in place.

``make setup`` puts ``libtcmalloc_minimal.so.4`` (Debian's ``libtcmalloc-minimal4``) under
``.venv/lib/native/``; a system-wide copy is used too. ``--allocator system`` opts out.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CHOICES = ("auto", "tcmalloc", "system")
LIBRARY = "libtcmalloc_minimal.so.4"
# Explicit path (wins over the search below), e.g. a site-specific build.
PATH_VAR = "SLIME_TCMALLOC"
_SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def venv_native_dir() -> Path:
    """Where ``make setup`` puts native libraries: ``<venv>/lib/native``."""
    return Path(sys.prefix) / "lib" / "native"


def find_tcmalloc() -> Path | None:
    """The tcmalloc shared library to preload, or None when there is none on this machine."""
    explicit = os.environ.get(PATH_VAR)
    candidates = [Path(explicit)] if explicit else []
    candidates += [venv_native_dir() / LIBRARY, *(Path(d) / LIBRARY for d in _SYSTEM_DIRS)]
    return next((c for c in candidates if c.is_file()), None)


def allocator_env(choice: str) -> dict[str, str]:
    """Environment variables that make a child process start with the chosen allocator.

    ``auto``: tcmalloc when found, else nothing (glibc). ``tcmalloc``: the same, but a missing
    library raises ``FileNotFoundError`` (start-up validation turns it into a flag error).
    ``system``: nothing. An existing ``LD_PRELOAD`` is kept after ours.
    """
    if choice not in CHOICES:
        raise ValueError(f"allocator must be one of {CHOICES}, got {choice!r}")
    if choice == "system":
        return {}
    lib = find_tcmalloc()
    if lib is None:
        if choice == "tcmalloc":
            raise FileNotFoundError(f"{LIBRARY} not found in {venv_native_dir()}, {', '.join(_SYSTEM_DIRS)} "
                                    f"or ${PATH_VAR}")
        return {}
    preload = [str(lib), *filter(None, os.environ.get("LD_PRELOAD", "").split(":"))]
    return {"LD_PRELOAD": ":".join(dict.fromkeys(preload))}


def active_allocator(pid: int | str = "self") -> str:
    """``"tcmalloc"`` if that library is mapped into process ``pid``, else ``"glibc"``."""
    maps = Path(f"/proc/{pid}/maps")
    try:
        text = maps.read_text()
    except OSError:
        return "unknown"
    return "tcmalloc" if "libtcmalloc" in text else "glibc"
