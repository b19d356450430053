"""Training on a rollout sampled by an older version (``--async-rollout``): the ratio and the gap
are taken against the version that sampled, from the adapters the trainer kept of it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slime.backends.megatron_utils.loss import policy_loss
from tests._support.dist import run_distributed
from tests._support.numerics import assert_close
from tests.backends.megatron_utils.test_actor import _init_actor, _rollout_data


def _stale_update(rank: int, checkpoint: str) -> dict:
    from slime.backends.megatron_utils.packing import collate, group_rows
    from slime.utils.errors import UserError

    actor = _init_actor(checkpoint, "--use-lora", "--lora-r", "8", "--async-rollout", "--check-logprob-gap", "1e-4")
    data = _rollout_data(actor.arch.vocab_size)
    mb = collate(group_rows(list(range(4)), data), data)

    def logprobs() -> torch.Tensor:
        with torch.no_grad():
            return actor._logprobs(actor.model, mb)[0]

    actor.export_weights()  # version 0 goes to the engines
    v0 = logprobs()
    for local, i in enumerate(mb.index):  # the engine of version 0 sampled the rollout
        data.rollout_logprobs[i] = v0[mb.sample == local].tolist()
    first = actor.train(0, dataclasses.replace(data, policy_version=0))  # version 0 -> 1
    v1 = logprobs()
    actor.export_weights()  # version 1 goes to the engines; the next rollout was sampled by 0 still
    second = actor.train(1, dataclasses.replace(data, policy_version=0))  # at version 1, sampled by 0
    pg, _ = policy_loss(v1, v0, mb.advantages, 0.2, 0.2)
    try:
        actor.train(2, dataclasses.replace(data, policy_version=0))  # two versions behind, --max-staleness 1
        too_old = None
    except UserError as exc:
        too_old = str(exc)
    return {"first": first, "second": second, "expected_loss": float(pg) / mb.num_tokens,
            "ratio_one_loss": float(-(mb.advantages).sum()) / mb.num_tokens,
            "moved": float((v1 - v0).abs().max()), "too_old": too_old}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from tests._support.tiny_models import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("versions"), family="qwen2")
    return run_distributed(_stale_update, 1, args=(str(checkpoint),))[0]


def test_a_rollout_of_the_trainers_version_is_not_stale(result):
    assert result["first"]["train/staleness"] == 0
    assert result["first"]["train/rollout_logprob_abs_diff"] < 1e-6


def test_the_gap_and_the_ratio_are_against_the_sampling_version(result):
    second = result["second"]
    assert result["moved"] > 1e-3  # version 1 differs from version 0 on these tokens
    assert second["train/staleness"] == 1
    # measured with version 0's adapters swapped in: the engine's log-probs are version 0's
    assert second["train/rollout_logprob_abs_diff"] < 1e-6
    # ratio pi_1 / pi_0, not 1
    assert_close(second["train/loss"], result["expected_loss"], atol=1e-6, rtol=1e-5, what="loss with pi_1 / pi_0")
    assert abs(second["train/loss"] - result["ratio_one_loss"]) > 1e-4


def test_a_rollout_older_than_max_staleness_stops_the_run(result):
    assert result["too_old"] is not None and "--max-staleness 1" in result["too_old"]
