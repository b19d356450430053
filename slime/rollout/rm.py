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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from slime.rollout.data import Sample
from slime.utils.errors import UserError

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


@dataclass(frozen=True)
class RewardFn:
    """A resolved reward function that awaits async results and validates every value."""

    name: str  # how errors refer to it: "--rm-type math" or the --custom-rm-path spec
    fn: RawRewardFn

    async def __call__(self, args: argparse.Namespace, sample: Sample) -> float:
        try:
            value: Any = self.fn(args, sample)
            if inspect.isawaitable(value):
                value = await value
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"reward function {self.name} raised on sample {sample.index}: {type(exc).__name__}: {exc}"
            ) from exc
        # bool is accepted on purpose: `return answer == label` is a fine 0/1 reward.
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise UserError(
                f"reward function {self.name} returned {value!r} for sample {sample.index}; "
                "it must return a finite number"
            )
        return float(value)


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
            raise UserError(f"{flag}: cannot import module {target!r} ({exc}); is it on PYTHONPATH?") from exc
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
        raise UserError(f"{flag}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
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
    """The reward of one sample under the flags' reward function."""
    return await load_reward_fn(args)(args, sample)


async def batch_rewards(args: argparse.Namespace, samples: Sequence[Sample]) -> list[float]:
    """Rewards of ``samples`` in order; async reward functions run concurrently."""
    reward_fn = load_reward_fn(args)
    return list(await asyncio.gather(*(reward_fn(args, s) for s in samples)))
