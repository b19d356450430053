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
    with pytest.raises(UserError, match=r"--rollout-engine 'nope': unknown; choose one of \['hf'\]"):
        engine_class("nope")


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_every_engine_is_accepted_by_the_flag_and_takes_the_flags_arguments(name):
    cls = engine_class(name)
    assert "apply_update" in PROTOCOL_METHODS and "pid" in PROTOCOL_METHODS
    assert [m for m in PROTOCOL_METHODS if not callable(getattr(cls, m, None))] == []
    args = parse_args(["--hf-checkpoint", "ckpt", "--rollout-engine", name])
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
    assert "--rollout-engine nope: unknown; choose one of hf" in message and "--prompt-data" in message
    assert "\n" not in message
