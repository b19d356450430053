"""group_advantages against hand-computed values; RolloutBatch and its prompt groups."""

import math

import pytest
import torch

from slime.rollout.batch import group_advantages


def test_group_advantages_grpo_normalises_by_unbiased_group_std():
    # group [1, 0, 0, 0]: mean 1/4, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    # group [2, 4, 4, 6]: mean 4, unbiased std sqrt((4 + 0 + 0 + 4) / 3) = sqrt(8/3)
    adv = group_advantages([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 4.0, 6.0], group_size=4, estimator="grpo")
    s = math.sqrt(8 / 3) + 1e-6
    expected = [0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -2 / s, 0.0, 0.0, 2 / s]
    assert adv.dtype == torch.float32 and adv.shape == (8,)
    assert adv.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_group_advantages_grpo_is_the_default_estimator():
    # group of two [1, 3]: mean 2, unbiased std sqrt(2)
    adv = group_advantages([1.0, 3.0], group_size=2)
    d = math.sqrt(2) + 1e-6
    assert adv.tolist() == pytest.approx([-1 / d, 1 / d], rel=1e-6)


def test_group_advantages_groups_are_consecutive_entries():
    # [0, 1 | 1, 1 | 5, 7]: each pair is centred on its own mean, not the batch mean
    adv = group_advantages([0.0, 1.0, 1.0, 1.0, 5.0, 7.0], group_size=2, estimator="dr_grpo")
    assert adv.tolist() == pytest.approx([-0.5, 0.5, 0.0, 0.0, -1.0, 1.0])


def test_group_advantages_dr_grpo_only_centres():
    adv = group_advantages([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 4.0, 6.0], group_size=4, estimator="dr_grpo")
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, -2.0, 0.0, 0.0, 2.0])


def test_group_advantages_reinforce_is_the_raw_reward():
    rewards = [1.0, 0.0, 0.5, 0.5, -2.0, 3.0]
    adv = group_advantages(rewards, group_size=3, estimator="reinforce")
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx(rewards)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo"])
def test_group_advantages_zero_variance_group_gives_zeros(estimator):
    adv = group_advantages([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0], group_size=3, estimator=estimator)
    assert adv[:6].tolist() == [0.0] * 6  # all-correct and all-wrong groups carry no signal
    assert torch.isfinite(adv).all()
    assert adv[6:].tolist() != [0.0] * 3


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo"])
def test_group_advantages_single_sample_groups_are_zero_not_nan(estimator):
    adv = group_advantages([1.0, 0.0, 0.3], group_size=1, estimator=estimator)
    assert adv.tolist() == [0.0, 0.0, 0.0]


def _batch(**overrides):
    from slime.rollout.batch import RolloutBatch

    fields = dict(tokens=[[1, 2, 7], [1, 2, 8, 9], [3, 5]], prompt_lens=[2, 2, 1],
                  rollout_logprobs=[[-0.1], [-0.2, -0.3], [-0.4]], advantages=[1.0, -1.0, 0.0], group_ids=[0, 0, 1])
    return RolloutBatch(**{**fields, **overrides})


def test_rollout_batch_splits_prompt_and_response_and_pickles():
    import pickle

    batch = _batch()
    assert len(batch) == 3
    assert (batch.prompt(1), batch.response(1)) == ([1, 2], [8, 9])
    assert pickle.loads(pickle.dumps(batch)) == batch  # it crosses Ray to the trainers


@pytest.mark.parametrize("overrides, message", [
    (dict(advantages=[1.0, -1.0]), "3 token lists"),
    (dict(group_ids=[0, 1, 0]), "group 0 is not consecutive"),
    (dict(group_ids=[0, 0, 0]), "share group 0 but not their prompt"),
])
def test_rollout_batch_rejects_inconsistent_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        _batch(**overrides)


def test_repeat_prompts_numbers_groups_and_continues_a_repeated_prompt():
    from slime.rollout.batch import RolloutBatch, repeat_prompts
    from slime.rollout.data import Sample

    prompts = [Sample(index=i, prompt=p, prompt_token_ids=ids)
               for i, (p, ids) in enumerate([("a", [1]), ("b", [2, 3]), ("b", [2, 3]), ("a", [1])])]
    samples = repeat_prompts(prompts, 2)
    assert [s.index for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]
    # the same prompt drawn twice in a row is one group (one packed row); drawn again later, a new one
    assert [s.group_index for s in samples] == [0, 0, 1, 1, 1, 1, 2, 2]
    assert prompts[0].group_index is None  # copies: the drawn prompts are left as they were
    for s in samples:
        s.response_token_ids, s.rollout_logprobs = [9], [-0.5]
    batch = RolloutBatch.from_samples(samples, [0.0] * 8)
    assert batch.group_ids == [0, 0, 1, 1, 1, 1, 2, 2]
    assert batch.tokens[2] == [2, 3, 9] and batch.prompt_lens[2] == 2 and batch.rollout_logprobs[2] == [-0.5]
