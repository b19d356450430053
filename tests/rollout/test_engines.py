"""The --rollout-engine table: every name resolves to a RolloutEngine class built from the flags."""

from __future__ import annotations

import inspect

import pytest
import torch

from slime.rollout.engine import RolloutEngine
from slime.rollout.engines import ENGINES, engine_class, engine_kwargs
from slime.rollout.hf_engine import HFRolloutEngine
from slime.ray.preflight import check_run
from slime.utils.arguments import parse_args
from slime.utils.errors import UserError

PROTOCOL_METHODS = sorted(name for name, value in vars(RolloutEngine).items()
                          if callable(value) and not name.startswith("_"))


def test_hf_is_the_built_in_engine():
    assert engine_class("hf") is HFRolloutEngine


def test_an_unknown_engine_is_a_user_error():
    with pytest.raises(UserError, match=r"--rollout-engine 'nope': unknown; choose one of \['hf', 'vllm'\]"):
        engine_class("nope")


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_every_engine_is_accepted_by_the_flag_and_takes_the_flags_arguments(name):
    cls = engine_class(name)
    assert "apply_update" in PROTOCOL_METHODS and "pid" in PROTOCOL_METHODS
    assert [m for m in PROTOCOL_METHODS if not callable(getattr(cls, m, None))] == []
    args = parse_args(["--hf-checkpoint", "ckpt", "--rollout-engine", name, "--use-lora"])
    inspect.signature(cls).bind(**engine_kwargs(args))  # raises TypeError when they do not fit


def test_engine_kwargs_follow_the_flags():
    kwargs = engine_kwargs(parse_args(["--hf-checkpoint", "ckpt", "--rollout-num-threads", "3"]))
    assert kwargs == {"hf_checkpoint_dir": "ckpt", "dtype": torch.float32, "num_threads": 3, "merge_adapters": True}
    kwargs = engine_kwargs(parse_args(["--hf-checkpoint", "ckpt", "--bf16", "--no-rollout-merge-lora"]))
    assert kwargs["dtype"] == torch.bfloat16 and kwargs["merge_adapters"] is False
    assert kwargs["num_threads"] >= 1  # default: every CPU


def test_an_unknown_engine_fails_at_start_up_with_the_others(tmp_path):
    args = parse_args(["--hf-checkpoint", str(tmp_path), "--prompt-data", str(tmp_path / "p.jsonl"),
                       "--rollout-engine", "nope"])
    with pytest.raises(UserError) as info:
        check_run(args)
    message = str(info.value)
    assert "--rollout-engine nope: unknown; choose one of hf, vllm" in message and "--prompt-data" in message
    assert "\n" not in message


def test_vllm_options_follow_the_flags():
    args = parse_args(["--hf-checkpoint", "ckpt", "--rollout-engine", "vllm", "--use-lora", "--lora-r", "12",
                       "--vllm-python", "/opt/v/bin/python", "--vllm-max-loras", "3", "--vllm-kv-cache-gib", "2",
                       "--vllm-extra-args", "--enforce-eager --max-num-seqs '64'", "--actor-timeout", "90"])
    options = engine_kwargs(args)["options"]
    assert (options.python, options.lora_rank, options.max_loras, options.kv_cache_gib, options.request_timeout_s) == \
        ("/opt/v/bin/python", 12, 3, 2, 90)
    assert options.extra_args == ["--enforce-eager", "--max-num-seqs", "64"]
    assert "options" not in engine_kwargs(parse_args(["--hf-checkpoint", "ckpt"]))


def test_what_vllm_cannot_do_is_refused_with_the_flags_in_one_go():
    from slime.utils.arguments import build_parser, validate_args

    args = build_parser().parse_args(["--hf-checkpoint", "ckpt", "--rollout-engine", "vllm", "--rollout-top-p", "0.9",
                                      "--vllm-start-timeout", "0", "--vllm-extra-args", "'unclosed"])
    errors = validate_args(args)
    assert any(e.startswith("--rollout-engine vllm syncs LoRA adapters only") and "--use-lora" in e for e in errors)
    assert any("--rollout-top-p 1 --rollout-top-k -1" in e for e in errors)
    assert any(e.startswith("--vllm-start-timeout must be > 0") for e in errors)
    assert any(e.startswith("--vllm-extra-args: not a shell-quoted string") for e in errors)


def test_a_rollouts_groups_are_split_whole_among_the_engines():
    from slime.ray.rollout import engine_shares

    assert engine_shares(32, 4, 1) == [slice(0, 32)]
    assert engine_shares(32, 4, 3) == [slice(0, 12), slice(12, 24), slice(24, 32)]
    assert engine_shares(8, 4, 3) == [slice(0, 4), slice(4, 8)]  # an engine without a group sits out
    shares = engine_shares(100, 1, 7)
    assert sum(s.stop - s.start for s in shares) == 100 and all(a.stop == b.start for a, b in zip(shares, shares[1:]))


def test_overlapped_runs_split_the_cores_between_trainers_and_engines(monkeypatch):
    from slime.rollout.engines import cpu_threads

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    flags = ["--hf-checkpoint", "ckpt", "--use-lora", "--actor-num-gpus-per-node", "2"]
    assert cpu_threads(parse_args(flags)) == (4, 8)  # synchronous: each side has the machine in turn
    assert cpu_threads(parse_args([*flags, "--async-rollout"])) == (2, 2)  # 2 trainers + 1 engine at once
    assert cpu_threads(parse_args([*flags, "--async-rollout", "--rollout-num-threads", "5"])) == (2, 5)
