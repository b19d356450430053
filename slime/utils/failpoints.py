"""Failpoints: named places where a test can make this process die a hard death.

``SLIME_FAILPOINT=NAME`` (or ``NAME@K``: its K-th hit, 1-based; default the first) makes the
process that reaches :func:`failpoint` ``NAME`` for the K-th time send itself SIGKILL there: no
``finally``, no atexit, no Ray clean-up, exactly what the OOM killer or ``kill -9`` does.  Hits
are counted per process.  Unset (always, outside tests) a failpoint costs one dict lookup.

The points, named by the process they are in (:data:`POINTS`):

* ``driver.after_generate``, ``driver.after_train``, ``driver.after_sync``, ``driver.after_save``:
  ``train.py``'s loop, after that phase of a rollout;
* ``trainer.train``: the start of a training step (training rank 0);
* ``trainer.save.mid``: inside a checkpoint save (rank 0), with the iteration's trainer state
  written to its staging directory and its weights and manifest not yet: a half-written iteration;
* ``trainer.save.unpublished``: a save's files and manifest complete, not yet renamed into place;
* ``engine.generate``, ``engine.apply_update``: the built-in rollout engine's calls (``hf``).

The variable reaches Ray actors through the job's runtime env
(:func:`slime.ray.cluster.worker_runtime_env`).
"""

from __future__ import annotations

import os
import signal

ENV = "SLIME_FAILPOINT"
POINTS: tuple[str, ...] = (
    "driver.after_generate", "driver.after_train", "driver.after_sync", "driver.after_save",
    "trainer.train", "trainer.save.mid", "trainer.save.unpublished",
    "engine.generate", "engine.apply_update",
)

_target: tuple[str, int] | None = None
_parsed = False
_hits = 0


def parse(spec: str) -> tuple[str, int]:
    """``"NAME"`` -> ``(NAME, 1)``, ``"NAME@K"`` -> ``(NAME, K)``; ValueError for an unknown name or a bad K."""
    name, _, hit = spec.strip().partition("@")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown failpoint {name!r}; one of {', '.join(POINTS)}")
    if hit and not (hit.isascii() and hit.isdigit() and int(hit) >= 1):
        raise ValueError(f"{ENV}={spec!r}: the hit after '@' must be a whole number >= 1")
    return name, int(hit) if hit else 1


def failpoint(name: str) -> None:
    """SIGKILL this process if ``$SLIME_FAILPOINT`` names this call (see the module doc)."""
    global _target, _parsed, _hits
    if not _parsed:
        spec = os.environ.get(ENV)
        _target = parse(spec) if spec else None
        _parsed = True
    if _target is None or _target[0] != name:
        return
    _hits += 1
    if _hits == _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
