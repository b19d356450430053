"""Rewards: score one rolled-out :class:`~slime.rollout.data.Sample` with a float.

Which function scores is decided by the flags, as in slime:

* ``--custom-rm-path module.path:function`` or ``path/to/file.py:function``:
  ``function(args, sample)``, sync or async, returning a number;
* otherwise ``--rm-type``: ``math`` (1.0 when the final number of the response,
  or the last ``\\boxed{...}``, equals the label numerically, else 0.0) or
  ``exact`` (1.0 when the stripped response equals the stripped label).

:func:`load_reward_fn` resolves the function once, so a bad ``--custom-rm-path``
fails at start-up, before any training.  A function that raises or returns
something other than a finite number becomes a UserError naming the sample.

Bounded waits (``--reward-timeout SECONDS``, default 60): a call that has not
returned after that long ends the run with a UserError naming the function,
the sample and the flag, instead of freezing the driver.  The batch is scored
exactly as without a timeout (sync functions one sample after another in
sample order, async ones concurrently on one event loop, a fresh loop per
batch) but on a *daemon thread*, while the calling thread watches each call's
age.  A thread, not a process, because a process would have to pickle the
function (a ``file.py:function`` module is not importable by name in a child),
would lose whatever the function keeps between calls (a client, a cache, a
counter), and would pay a fork of the driver per batch; the price is that a
stuck thread cannot be killed, so it is a daemon (the process still exits)
and an async call is cancelled on its loop.  Two limits of threads: a call
that never releases the GIL (a C extension looping inside one call) also
stalls the watcher, and ``signal`` handlers can only be installed in the main
thread, so a function that times itself with ``signal.alarm`` needs
``--reward-timeout 0``: no limit, the function runs in the calling thread as
before.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from slime.rollout.data import Sample
from slime.utils.errors import UserError

DEFAULT_REWARD_TIMEOUT_S = 60.0
RawRewardFn = Callable[[argparse.Namespace, Sample], "float | Awaitable[float]"]

# A number not glued to a preceding digit (so the "-" in "5-3" is not a sign):
# "1,234,567" thousands groups (exactly three digits each), plain integers and
# decimals, or ".5".
_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_BOXED = "\\boxed{"


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces balanced; None if there is none or it is unclosed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 1
    for i in range(start + len(_BOXED), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len(_BOXED) : i]
    return None


def extract_final_number(text: str) -> float | None:
    """The answer a response commits to: the last number inside the last ``\\boxed{}``
    if there is one, else the last number in the text; None when there is no number.

    >>> extract_final_number("2 + 3 = 5.")
    5.0
    >>> extract_final_number("so \\\\boxed{-1,234.5}, not 7")
    -1234.5
    """
    boxed = _last_boxed(text)
    matches = _NUMBER.findall(text if boxed is None else boxed)
    return float(matches[-1].replace(",", "")) if matches else None


def _label_number(sample: Sample) -> float:
    number = extract_final_number(str(sample.label)) if sample.label is not None else None
    if number is None:
        raise UserError(
            f"sample {sample.index}: label {sample.label!r} holds no number for --rm-type math; "
            "fix the label or use --rm-type exact"
        )
    return number


def math_reward(args: argparse.Namespace, sample: Sample) -> float:
    """1.0 when the response's final number equals the label's number, else 0.0."""
    answer = extract_final_number(sample.response)
    target = _label_number(sample)
    return float(answer is not None and math.isclose(answer, target, rel_tol=1e-9, abs_tol=1e-9))


def exact_reward(args: argparse.Namespace, sample: Sample) -> float:
    """1.0 when the stripped response equals the stripped label, else 0.0."""
    if sample.label is None:
        raise UserError(f"sample {sample.index}: no label for --rm-type exact; add labels (--label-key)")
    return float(sample.response.strip() == str(sample.label).strip())


BUILTIN_REWARDS: dict[str, RawRewardFn] = {"math": math_reward, "exact": exact_reward}


def label_problem(args: argparse.Namespace) -> Callable[[Any], str | None] | None:
    """``check(label)``: why the built-in ``--rm-type`` could not score a prompt with this label, or None;
    for the start-up checks of every prompt file.  None for ``--custom-rm-path`` (its labels are its own)."""
    if getattr(args, "custom_rm_path", None) or args.rm_type not in BUILTIN_REWARDS:
        return None
    key, rm_type = getattr(args, "label_key", "label"), args.rm_type

    def check(label: Any) -> str | None:
        if label is None:
            return (f"no '{key}' field, which --rm-type {rm_type} scores the responses against; set --label-key "
                    "to the answer field")
        if rm_type == "math" and extract_final_number(str(label)) is None:
            return f"label {label!r:.80} holds no number for --rm-type math; fix the label or use --rm-type exact"
        return None

    return check


@dataclass(frozen=True)
class RewardFn:
    """A resolved reward function that awaits async results and validates every value."""

    name: str  # how errors refer to it: "--rm-type math" or the --custom-rm-path spec
    fn: RawRewardFn

    @property
    def flag(self) -> str:
        """The flags that chose this function: ``--rm-type math`` or ``--custom-rm-path SPEC``."""
        return self.name if self.name.startswith("--") else f"--custom-rm-path {self.name}"

    async def __call__(self, args: argparse.Namespace, sample: Sample) -> float:
        try:
            value: Any = self.fn(args, sample)
            if inspect.isawaitable(value):
                value = await value
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"reward function {self.name} raised on sample {sample.index}: {type(exc).__name__}: {_one_line(exc)}"
            ) from exc
        # bool is accepted on purpose: `return answer == label` is a fine 0/1 reward.
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise UserError(
                f"reward function {self.name} returned {_one_line(repr(value), 120)} for sample {sample.index}; "
                "it must return a finite number"
            )
        return float(value)


def _one_line(value: object, limit: int = 300) -> str:
    """``str(value)`` (an exception's message) as one line of at most ``limit`` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _import_custom(spec: str) -> RawRewardFn:
    flag = f"--custom-rm-path {spec}"
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UserError(f"{flag}: expected module.path:function or path/to/file.py:function")
    if target.endswith(".py"):
        module = _load_file_module(Path(target), flag)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UserError(f"{flag}: cannot import module {target!r} ({_one_line(exc)}); is it on PYTHONPATH?"
                            ) from exc
        except Exception as exc:  # the module's own code failing at import time, as for a file below
            raise UserError(f"{flag}: importing module {target!r} failed: {type(exc).__name__}: {_one_line(exc)}"
                            ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        problem = "is not defined" if fn is None else "is not callable"
        raise UserError(f"{flag}: {attr!r} {problem} in {target}")
    return fn


def _load_file_module(path: Path, flag: str) -> Any:
    if not path.is_file():
        raise UserError(f"{flag}: file {path} not found")
    spec = importlib.util.spec_from_file_location(f"slime_custom_rm_{path.stem}", path)
    assert spec is not None and spec.loader is not None  # always set for an existing .py path
    module = importlib.util.module_from_spec(spec)
    # User code failing at import time is a user error too: it names the file.
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UserError(f"{flag}: importing {path} failed: {type(exc).__name__}: {_one_line(exc)}") from exc
    return module


@functools.lru_cache(maxsize=None)
def _resolve(custom_rm_path: str | None, rm_type: str) -> RewardFn:
    # Cached so per-sample calls do not re-import a custom module each time.
    if custom_rm_path:
        return RewardFn(custom_rm_path, _import_custom(custom_rm_path))
    if rm_type not in BUILTIN_REWARDS:
        valid = ", ".join(sorted(BUILTIN_REWARDS))
        raise UserError(f"--rm-type {rm_type!r} is unknown; valid values: {valid} (or give --custom-rm-path)")
    return RewardFn(f"--rm-type {rm_type}", BUILTIN_REWARDS[rm_type])


def load_reward_fn(args: argparse.Namespace) -> RewardFn:
    """Resolve the reward function the flags name; call once at start-up to fail early."""
    return _resolve(getattr(args, "custom_rm_path", None), args.rm_type)


async def compute_reward(args: argparse.Namespace, sample: Sample) -> float:
    """The reward of one sample under the flags' reward function (bounded by ``--reward-timeout``)."""
    return (await batch_rewards(args, [sample]))[0]


async def batch_rewards(args: argparse.Namespace, samples: Sequence[Sample]) -> list[float]:
    """Rewards of ``samples`` in order; async reward functions run concurrently.

    Each call is bounded by ``args.reward_timeout`` seconds (0: no limit, scored in this thread).
    """
    reward_fn = load_reward_fn(args)
    timeout = getattr(args, "reward_timeout", DEFAULT_REWARD_TIMEOUT_S)
    if not timeout:
        return await _score_all(reward_fn, args, samples, _InFlight())
    return await _BoundedBatch(reward_fn, args, samples, timeout).run()


class _InFlight:
    """Start times of the calls now running, by position in the batch (written by the worker thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}

    def start(self, position: int) -> None:
        with self._lock:
            self._started[position] = time.monotonic()

    def finish(self, position: int) -> None:
        with self._lock:
            self._started.pop(position, None)

    def oldest(self) -> tuple[int, float] | None:
        """``(position, start)`` of the longest-running call, or None when none runs."""
        with self._lock:
            return min(self._started.items(), key=lambda item: item[1], default=None)


async def _score_all(reward_fn: RewardFn, args: argparse.Namespace, samples: Sequence[Sample],
                     in_flight: _InFlight) -> list[float]:
    """Score every sample in order; a sync function runs to completion before the next call starts."""

    async def one(position: int, sample: Sample) -> float:
        in_flight.start(position)
        try:
            return await reward_fn(args, sample)
        finally:
            in_flight.finish(position)

    return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(samples))))


class _BoundedBatch:
    """One batch scored by :func:`_score_all` on a daemon thread, watched from the calling coroutine."""

    def __init__(self, reward_fn: RewardFn, args: argparse.Namespace, samples: Sequence[Sample],
                 timeout: float) -> None:
        self.reward_fn, self.args, self.samples, self.timeout = reward_fn, args, list(samples), timeout
        self.in_flight = _InFlight()
        self.outcome: dict[str, Any] = {}  # "result" or "error", set by the worker
        self.worker_loop: asyncio.AbstractEventLoop | None = None
        self.worker_task: asyncio.Task | None = None

    async def run(self) -> list[float]:
        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def on_finished() -> None:
            if not finished.done():
                finished.set_result(None)

        def work() -> None:
            try:
                self.outcome["result"] = asyncio.run(self._score())
            except BaseException as exc:  # noqa: BLE001 - handed to the watcher as it is
                self.outcome["error"] = exc
            try:
                loop.call_soon_threadsafe(on_finished)
            except RuntimeError:  # the watcher gave up and its loop is closed: nobody is waiting
                pass

        threading.Thread(target=work, name="slime-reward", daemon=True).start()
        while not finished.done():
            oldest = self.in_flight.oldest()
            # Wake at the oldest running call's deadline; with none running, a later call's is later.
            wait = self.timeout if oldest is None else oldest[1] + self.timeout - time.monotonic()
            if wait <= 0:
                self._cancel()
                assert oldest is not None
                raise UserError(self._hung_message(self.samples[oldest[0]])) from None
            await asyncio.wait([finished], timeout=wait)
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["result"]

    async def _score(self) -> list[float]:
        self.worker_loop, self.worker_task = asyncio.get_running_loop(), asyncio.current_task()
        return await _score_all(self.reward_fn, self.args, self.samples, self.in_flight)

    def _cancel(self) -> None:
        """Cancel the worker's remaining calls (an awaiting one stops; a sync one cannot be stopped)."""
        loop, task = self.worker_loop, self.worker_task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # its loop has just finished
                pass

    def _hung_message(self, sample: Sample) -> str:
        t = f"{self.timeout:g}"
        return (f"reward function {self.reward_fn.flag} has not returned for sample {sample.index} after {t} s "
                f"(--reward-timeout {t}); make it return (or raise) sooner, or raise --reward-timeout (0: no limit)")
