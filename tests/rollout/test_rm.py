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


# --------------------------------------------------------------------------- --reward-timeout: bounded waits

HUNG_RM = """
    import asyncio
    import threading
    import time

    STOP = threading.Event()  # the test releases the busy loop so no thread spins after it
    CALLS = []

    def sleeps(args, sample):
        if sample.response == "hang":
            time.sleep(1e9)
        return 1.0

    def spins(args, sample):
        if sample.response == "hang":
            while not STOP.is_set():
                pass
        return 1.0

    async def awaits_forever(args, sample):
        if sample.response == "hang":
            await asyncio.Event().wait()
        return 1.0

    def slow(args, sample):
        time.sleep(0.3)
        return 2.0

    def records(args, sample):
        CALLS.append((sample.index, threading.current_thread().name))
        return float(sample.index)
"""


def _timed_args(path: Path, fn: str, timeout: float) -> argparse.Namespace:
    args = _args(custom_rm_path=f"{path}:{fn}")
    args.reward_timeout = timeout
    return args


@pytest.mark.timeout(20)  # without the bound the call never returns
@pytest.mark.parametrize("fn", ["sleeps", "spins", "awaits_forever"])
def test_a_hung_reward_function_ends_in_one_line_within_the_timeout(tmp_path: Path, capfd, fn: str) -> None:
    """A reward function that never returns (sleeping, spinning or awaiting forever) cannot freeze the
    driver: after --reward-timeout a UserError names the function, the sample and the flag."""
    import gc
    import threading
    import time

    path = _write_rm(tmp_path / "hung_rm.py", HUNG_RM)
    args = _timed_args(path, fn, 0.5)
    samples = [_sample("fine", index=3), _sample("hang", index=5), _sample("fine", index=8)]
    before = set(threading.enumerate())  # an earlier case's sleeping thread stays (a daemon) for good

    def workers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "slime-reward" and t not in before]

    start = time.monotonic()
    try:
        with pytest.raises(UserError) as info:
            asyncio.run(batch_rewards(args, samples))
    finally:
        load_reward_fn(args).fn.__globals__["STOP"].set()
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert message == (f"reward function --custom-rm-path {path}:{fn} has not returned for sample 5 after 0.5 s "
                       "(--reward-timeout 0.5); make it return (or raise) sooner, or raise --reward-timeout "
                       "(0: no limit)"), message
    assert 0.5 <= elapsed < 3.0, elapsed
    if fn != "sleeps":  # a spinning call sees STOP, an awaiting one is cancelled: the worker thread ends
        deadline = time.monotonic() + 5
        while workers() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not workers()
    assert all(t.daemon for t in workers())
    gc.collect()
    assert "never retrieved" not in capfd.readouterr().err


def test_a_hung_reward_function_cannot_keep_the_process_alive(tmp_path: Path) -> None:
    """The stuck call's thread is a daemon: the CLI prints its one line and the process exits."""
    import subprocess
    import sys

    path = _write_rm(tmp_path / "hung_rm.py", HUNG_RM)
    code = textwrap.dedent(f"""
        import argparse, asyncio
        from slime.rollout.data import Sample
        from slime.rollout.rm import batch_rewards
        from slime.utils.errors import run_main
        args = argparse.Namespace(rm_type="math", custom_rm_path={str(path) + ':spins'!r}, reward_timeout=0.5)
        run_main(lambda: asyncio.run(batch_rewards(args, [Sample(index=2, prompt="q", prompt_token_ids=[1],
                                                                 response="hang")])))
    """)
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: reward function --custom-rm-path ") and result.stderr.count("\n") == 1
    assert "for sample 2 after 0.5 s" in result.stderr


def test_the_timeout_bounds_each_call_not_the_batch(tmp_path: Path) -> None:
    """Three 0.3 s calls under a 0.5 s timeout: each returns in time, so the batch (0.9 s) is scored."""
    path = _write_rm(tmp_path / "rm.py", HUNG_RM)
    samples = [_sample("a", index=i) for i in range(3)]
    assert asyncio.run(batch_rewards(_timed_args(path, "slow", 0.5), samples)) == [2.0, 2.0, 2.0]
    with pytest.raises(UserError, match=r"has not returned for sample 0 after 0\.1 s \(--reward-timeout 0\.1\)"):
        asyncio.run(batch_rewards(_timed_args(path, "slow", 0.1), samples))


def test_timeout_zero_means_no_limit_and_runs_in_the_calling_thread(tmp_path: Path) -> None:
    import threading

    path = _write_rm(tmp_path / "rm.py", HUNG_RM)
    samples = [_sample("a", index=i) for i in range(3)]
    assert asyncio.run(batch_rewards(_timed_args(path, "slow", 0), samples)) == [2.0, 2.0, 2.0]
    args = _timed_args(path, "records", 0)
    asyncio.run(batch_rewards(args, samples))
    calls = load_reward_fn(args).fn.__globals__["CALLS"]
    assert calls == [(i, threading.current_thread().name) for i in range(3)]


def test_sync_rewards_run_one_at_a_time_in_sample_order(tmp_path: Path) -> None:
    """Under a timeout a sync function still sees the samples one after another, in order (a stateful
    function behaves as before), in one worker thread per batch."""
    path = _write_rm(tmp_path / "rm.py", HUNG_RM)
    args = _timed_args(path, "records", 60)
    samples = [_sample("a", index=i) for i in (4, 1, 7, 2, 9)]
    assert asyncio.run(batch_rewards(args, samples)) == [4.0, 1.0, 7.0, 2.0, 9.0]
    calls = load_reward_fn(args).fn.__globals__["CALLS"]
    assert [index for index, _ in calls] == [4, 1, 7, 2, 9]
    assert len({thread for _, thread in calls}) == 1


def test_math_rewards_are_identical_with_and_without_a_timeout() -> None:
    """The demo's reward (--rm-type math): the same values, in the same order, whichever way it runs."""
    import random

    from slime.rollout.rm import math_reward

    rng = random.Random(0)
    samples = [_sample(f"{rng.choice(['so', 'thus', ''])} {rng.randint(0, 20)}.{rng.choice(['', '0', '5'])}",
                       str(rng.randint(0, 20)), i) for i in range(200)]
    expected = [math_reward(None, s) for s in samples]
    assert 0 < sum(expected) < len(expected)
    for timeout in (60.0, 0.0):
        args = _args("math")
        args.reward_timeout = timeout
        assert asyncio.run(batch_rewards(args, samples)) == expected


def test_errors_inside_the_worker_keep_their_one_line(tmp_path: Path) -> None:
    path = _write_rm(tmp_path / "rm.py", "def f(args, sample):\n    raise KeyError('answer')\n")
    args = _timed_args(path, "f", 5)
    with pytest.raises(UserError, match=r"reward function .*:f raised on sample 7: KeyError: 'answer'"):
        asyncio.run(batch_rewards(args, [_sample("x", index=7)]))
