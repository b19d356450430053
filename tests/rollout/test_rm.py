"""Rewards: number extraction, built-in math/exact, custom functions, every error."""

from __future__ import annotations

import argparse
import asyncio
import textwrap
from pathlib import Path

import pytest

from slime.rollout.data import Sample
from slime.rollout.rm import batch_rewards, compute_reward, extract_final_number, load_reward_fn
from slime.utils.errors import UserError


def _args(rm_type: str = "math", custom_rm_path: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(rm_type=rm_type, custom_rm_path=custom_rm_path)


def _sample(response: str, label: object = "5", index: int = 0) -> Sample:
    return Sample(index=index, prompt="q", prompt_token_ids=[1], label=label, response=response)


def _reward(args: argparse.Namespace, sample: Sample) -> float:
    return asyncio.run(compute_reward(args, sample))


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("2 + 3 = 5", 5.0),
        ("The answer is 5.", 5.0),
        ("x = -3 degrees", -3.0),
        ("5-3 is 2", 2.0),
        ("5-3", 3.0),  # a hyphen after a digit is subtraction, not a sign
        ("about 1,234 apples", 1234.0),
        ("-1,234,567.25", -1234567.25),
        ("1,2,3", 3.0),  # not thousands groups: a list
        ("12,3456", 3456.0),
        ("pi is 3.14", 3.14),
        ("half is .5", 0.5),
        ("\\boxed{42} and then step 7", 42.0),
        ("\\boxed{1} first, \\boxed{x = 17} last", 17.0),
        ("\\boxed{{9}}", 9.0),
        ("unclosed \\boxed{4 then 8", 8.0),  # no complete box: fall back to the text
        ("no digits here", None),
        ("\\boxed{none} but 3 outside", None),
        ("", None),
    ],
)
def test_extract_final_number(text: str, number: float | None) -> None:
    assert extract_final_number(text) == number


@pytest.mark.parametrize(
    ("response", "label", "reward"),
    [
        ("2 + 3 = 5<|im_end|>", "5", 1.0),
        ("5.0", "5", 1.0),
        ("It is 5, I think. Or 6", "5", 0.0),
        ("no idea", "5", 0.0),
        ("\\boxed{-7}", -7, 1.0),
        ("1,234", "1234", 1.0),
        ("0.1", "0.10", 1.0),
    ],
)
def test_math_reward(response: str, label: object, reward: float) -> None:
    assert _reward(_args("math"), _sample(response, label)) == reward


def test_math_reward_needs_a_numeric_label() -> None:
    with pytest.raises(UserError, match=r"sample 4: label 'five' holds no number for --rm-type math; .*exact"):
        _reward(_args("math"), _sample("5", "five", index=4))
    with pytest.raises(UserError, match="sample 2: label None holds no number"):
        _reward(_args("math"), _sample("5", None, index=2))


def test_exact_reward() -> None:
    assert _reward(_args("exact"), _sample("  Paris\n", " Paris")) == 1.0
    assert _reward(_args("exact"), _sample("paris", "Paris")) == 0.0
    assert _reward(_args("exact"), _sample("5", 5)) == 1.0
    with pytest.raises(UserError, match="sample 3: no label for --rm-type exact"):
        _reward(_args("exact"), _sample("x", None, index=3))


def test_unknown_rm_type_names_flag_and_values() -> None:
    with pytest.raises(UserError, match=r"--rm-type 'f1' is unknown; valid values: exact, math"):
        load_reward_fn(_args("f1"))


def _write_rm(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def test_custom_file_sync_and_async(tmp_path: Path) -> None:
    path = _write_rm(tmp_path / "my_rm.py", """
        import asyncio

        def length(args, sample):
            return len(sample.response)

        async def slow_match(args, sample):
            await asyncio.sleep(0.01)
            return sample.response == sample.label  # a bool is a 0/1 reward
    """)
    samples = [_sample("abc", "abc", 0), _sample("hello", "x", 1)]
    assert asyncio.run(batch_rewards(_args(custom_rm_path=f"{path}:length"), samples)) == [3.0, 5.0]
    assert asyncio.run(batch_rewards(_args(custom_rm_path=f"{path}:slow_match"), samples)) == [1.0, 0.0]


def test_custom_module_path_overrides_rm_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_rm(tmp_path / "team_rewards_mod.py", "def always_half(args, sample):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = _args("not-a-type", custom_rm_path="team_rewards_mod:always_half")
    assert load_reward_fn(args).name == "team_rewards_mod:always_half"
    assert _reward(args, _sample("anything")) == 0.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", r"expected module\.path:function or path/to/file\.py:function"),
        ("mod:", r"expected module\.path:function"),
        ("surely_missing_module_xyz:f", r"cannot import module 'surely_missing_module_xyz'"),
        ("{tmp}/absent.py:f", r"file .*absent\.py not found"),
        ("{tmp}/rm.py:missing", r"'missing' is not defined in .*rm\.py"),
        ("{tmp}/rm.py:CONSTANT", r"'CONSTANT' is not callable"),
        ("{tmp}/broken.py:f", r"importing .*broken\.py failed: ZeroDivisionError"),
    ],
)
def test_bad_custom_rm_path_fails_at_load(tmp_path: Path, spec: str, message: str) -> None:
    _write_rm(tmp_path / "rm.py", "CONSTANT = 1\n")
    _write_rm(tmp_path / "broken.py", "x = 1 / 0\n")
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(UserError, match=rf"^--custom-rm-path {spec}: {message}"):
        load_reward_fn(_args(custom_rm_path=spec))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("raise KeyError('answer')", r"reward function .*:f raised on sample 7: KeyError: 'answer'"),
        ("return 'high'", r"reward function .*:f returned 'high' for sample 7; it must return a finite number"),
        ("return None", r"returned None for sample 7"),
        ("return float('nan')", r"returned nan for sample 7"),
    ],
)
def test_custom_reward_bad_result_names_sample_and_function(tmp_path: Path, body: str, message: str) -> None:
    path = _write_rm(tmp_path / "rm.py", f"def f(args, sample):\n    {body}\n")
    with pytest.raises(UserError, match=message):
        _reward(_args(custom_rm_path=f"{path}:f"), _sample("x", index=7))


def test_async_custom_reward_that_raises(tmp_path: Path) -> None:
    path = _write_rm(tmp_path / "rm.py", "async def f(args, sample):\n    raise RuntimeError('judge down')\n")
    samples = [_sample("x", index=0), _sample("y", index=1)]
    with pytest.raises(UserError, match=r"raised on sample 0: RuntimeError: judge down"):
        asyncio.run(batch_rewards(_args(custom_rm_path=f"{path}:f"), samples))


def test_batch_rewards_keeps_order() -> None:
    samples = [_sample(r, "5", i) for i, r in enumerate(["5", "4", "=5", "five"])]
    assert asyncio.run(batch_rewards(_args("math"), samples)) == [1.0, 0.0, 1.0, 0.0]
