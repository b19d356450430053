"""A dead or hung actor ends the run with one line, not a Ray traceback.

Inside :func:`actor_failures_end_the_run` (``train.py`` wraps its whole run in it), two failures
become an :class:`ActorFailure`, which :func:`~slime.utils.errors.run_main` prints as one line on
stderr before the process exits with status 3:

* an actor died (SIGKILL, the OOM killer, a crash): ``ray.exceptions.RayActorError`` from the call
  waiting on it, or, when another rank noticed first (a collective lost its peer), any Ray error
  after which a quick probe of every actor finds a dead one;
* a call has not returned within ``--actor-timeout`` (:class:`~slime.ray.actor_group.ActorTimeoutError`);
* an actor reported a :class:`~slime.utils.errors.ResumableFailure` (its vLLM server died).

The line names what failed (``the rollout engine (pid 123)``, ``training rank 1 (pid 124)``) and
how (Ray's exit cause, shortened, or the method and the deadline), the newest complete checkpoint
under ``--save``, the command that resumes from it (the original command line with
``--load SAVE`` added or replaced; without a checkpoint the original command) and the file that
holds the full Ray traceback: ``--log-dir/actor_failure.log``, else a temporary file.

A Ray error that is neither (a remote bug) is re-raised as it is, traceback included.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import ray
from ray.exceptions import RayActorError, RayError

from slime.backends.megatron_utils.checkpoint import newest_checkpoint
from slime.ray.actor_group import ActorTimeoutError, registered_groups
from slime.utils.errors import ResumableFailure

LOG_NAME = "actor_failure.log"
# How long the actors get to answer "are you alive?" after a Ray error that names no dead actor.
PROBE_S = 2.0


class ActorFailure(ResumableFailure):
    """An actor died or hung, or a service it runs failed; the message is the one-line report."""


# ------------------------------------------------------------------------------ the message


def resume_command(command: Sequence[str], load_dir: str) -> str:
    """``command`` (the original command line) with ``--load load_dir`` replacing any ``--load``
    (``--load X`` or ``--load=X``), or appended; quoted for a POSIX shell."""
    out: list[str] = []
    replaced = False
    tokens = iter(command)
    for token in tokens:
        if token == "--load" or token.startswith("--load="):
            if token == "--load":
                next(tokens, None)
            if not replaced:
                out += ["--load", load_dir]
                replaced = True
            continue
        out.append(token)
    return shlex.join(out if replaced else [*out, "--load", load_dir])


def checkpoint_and_command(save_dir: str | None, command: Sequence[str]) -> str:
    """``newest checkpoint: DIR (rollout N); resume with: CMD``, or where none: the original command."""
    if not save_dir:
        return f"no checkpoint (no --save); start again with: {shlex.join(command)}"
    found = newest_checkpoint(save_dir)
    if found is None:
        return f"no checkpoint under --save {save_dir} yet; start again with: {shlex.join(command)}"
    iteration, iter_dir = found
    return f"newest checkpoint: {iter_dir} (rollout {iteration}); resume with: {resume_command(command, save_dir)}"


def short_cause(message: str) -> str:
    """Ray's account of an actor's death in one short sentence.

    System deaths keep the exit type and Ray's detail up to its list of common causes
    (``SYSTEM_ERROR: Worker unexpectedly exits ...``); otherwise the sentence that says why
    (``The actor is dead because ...``), else the first line.
    """
    typed = re.search(r"Worker exit type: (\S+) Worker exit detail: (.*?)(?: Some common causes|$)", message,
                      re.DOTALL)
    if typed:
        return f"{typed.group(1)}: {' '.join(typed.group(2).split())}"
    because = re.search(r"^The actor is dead because.*$", message, re.MULTILINE)
    if because:
        return because.group(0).strip()
    return message.strip().splitlines()[0].strip() if message.strip() else "Ray gave no cause"


def _write_log(log_dir: str | None, text_for: Callable[[Path], str]) -> Path:
    """Write ``text_for(path)`` to ``log_dir/actor_failure.log``, or where that fails (or without
    ``--log-dir``) to a new temporary file; returns the path written."""
    if log_dir:
        path = Path(log_dir) / LOG_NAME
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text_for(path))
            return path
        except OSError:
            pass
    fd, name = tempfile.mkstemp(prefix="slime-actor-failure-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text_for(Path(name)))
    return Path(name)


def failure_line(what: str, args: argparse.Namespace, error: BaseException,
                 argv: Sequence[str] | None = None) -> tuple[str, Path]:
    """The one-line report of ``what`` failed, and the log file that got ``error``'s full traceback.

    ``argv`` is the run's command line (default ``sys.orig_argv``: the interpreter and its
    options, then ``train.py`` and its flags, as typed)."""
    command = list(sys.orig_argv if argv is None else argv)
    head = f"{what}; {checkpoint_and_command(getattr(args, 'save', None), command)}; details: "
    details = "".join(traceback.format_exception(error))
    log = _write_log(getattr(args, "log_dir", None), lambda path: f"{head}{path}\n\n{details}")
    return f"{head}{log}", log


# ------------------------------------------------------------------------------ finding the failed actor


def _labels_by_actor_id() -> dict[str, str]:
    return {actor._actor_id.hex(): group.label(rank)
            for group in registered_groups() for rank, actor in enumerate(group.actors)}


def _unknown_actor_label(error: RayActorError) -> str:
    """An actor no group knows (it died before its group was registered): Ray's class name and pid."""
    text = str(error)
    cls, pid = re.search(r"class_name: (\S+)", text), re.search(r"\bpid: (\d+)", text)
    who = f"an actor of class {cls.group(1)}" if cls else "a Ray actor"
    return f"{who} (pid {pid.group(1)})" if pid else who


def _probe_dead() -> list[tuple[str, RayActorError]]:
    """``(label, error)`` of every registered actor that does not answer because it is dead.

    A dead actor's probe fails at once; a busy one (e.g. in a collective waiting for the dead
    one) does not answer within :data:`PROBE_S` and counts as alive."""
    probes = {actor.__ray_ready__.remote(): group.label(rank)
              for group in registered_groups() for rank, actor in enumerate(group.actors)}
    if not probes:
        return []
    ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=PROBE_S)
    dead = []
    for ref in ready:
        try:
            ray.get(ref)
        except RayActorError as error:
            dead.append((probes[ref], error))
    return dead


def describe_death(error: RayError) -> str | None:
    """``LABEL died (CAUSE)`` for the actor behind ``error``, or None when no actor died."""
    if isinstance(error, RayActorError):
        label = _labels_by_actor_id().get(error.actor_id or "")
        if label is not None:
            return f"{label} died ({short_cause(str(error))})"
    dead = _probe_dead()
    if dead:
        labels = ", ".join(label for label, _ in dead)
        return f"{labels} died ({short_cause(str(dead[0][1]))})"
    if isinstance(error, RayActorError):
        return f"{_unknown_actor_label(error)} died ({short_cause(str(error))})"
    return None


@contextmanager
def actor_failures_end_the_run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> Iterator[None]:
    """Turn a dead actor or a call past ``--actor-timeout`` into one :class:`ActorFailure` line.

    Use inside the Ray cluster's context (the probes need Ray); other errors pass unchanged."""
    try:
        yield
    except ActorFailure:
        raise
    except ResumableFailure as error:  # raised inside an actor: e.g. its vLLM server died
        raise ActorFailure(failure_line(str(error), args, error, argv)[0]) from None
    except ActorTimeoutError as error:
        what = f"{error} (--actor-timeout {args.actor_timeout:g})"
        raise ActorFailure(failure_line(what, args, error, argv)[0]) from None
    except RayError as error:
        what = describe_death(error)
        if what is None:
            raise
        raise ActorFailure(failure_line(what, args, error, argv)[0]) from None
