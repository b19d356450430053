"""Clipped surrogate, KL estimators and token log-probs/entropy against hand-computed values."""

import math

import pytest
import torch

from slime.backends.megatron_utils.loss import kl_penalty, policy_loss, token_logprobs_and_entropy

LN2 = math.log(2.0)


def _logp_pair(ratios):
    """(logp, old_logp) whose exp-difference is exactly ``ratios`` (old_logp = -1 everywhere)."""
    old = torch.full((len(ratios),), -1.0, dtype=torch.float64)
    return old + torch.log(torch.tensor(ratios, dtype=torch.float64)), old


# --------------------------------------------------------------------------- policy_loss

def test_policy_loss_hand_example_with_both_advantage_signs():
    # eps_low = 0.2, eps_high = 0.28: ratio is clipped to [0.8, 1.28].
    #   A    ratio  -A*r    -A*clip(r)  max     clipping bit?
    #   +1   1.5    -1.5    -1.28       -1.28   yes
    #   +1   0.5    -0.5    -0.8        -0.5    no  (pessimistic bound keeps the unclipped term)
    #   -1   0.5     0.5     0.8         0.8    yes
    #   -1   1.5     1.5     1.28        1.5    no
    #   +2   1.1    -2.2    -2.2        -2.2    no  (inside the range)
    #    0   3.0     0       0           0      no
    logp, old = _logp_pair([1.5, 0.5, 0.5, 1.5, 1.1, 3.0])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, 0.0], dtype=torch.float64)
    loss, n_clipped = policy_loss(logp, old, adv, eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx(-1.28 - 0.5 + 0.8 + 1.5 - 2.2 + 0.0, abs=1e-12)
    assert n_clipped.item() == 2


def test_policy_loss_gradient_vanishes_on_clipped_tokens():
    logp, old = _logp_pair([1.5, 0.5, 0.5, 1.5, 1.1, 3.0])
    logp.requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, 0.0], dtype=torch.float64)
    loss, _ = policy_loss(logp, old, adv, eps_low=0.2, eps_high=0.28)
    loss.backward()
    # d(-A r)/d logp = -A r where the unclipped term wins, 0 where the clipped (constant) one wins
    expected = [0.0, -0.5, 0.0, 1.5, -2.2, 0.0]
    assert logp.grad.tolist() == pytest.approx(expected, abs=1e-12)


def test_policy_loss_clip_range_is_asymmetric():
    # ratio 1.25 with A > 0: inside [1 - 0.2, 1 + 0.28], although a symmetric 0.2 would clip it.
    logp, old = _logp_pair([1.25])
    loss, n = policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and n.item() == 0
    loss, n = policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), eps_low=0.2, eps_high=0.2)
    assert loss.item() == pytest.approx(-1.2) and n.item() == 1
    # ratio 0.78 with A < 0: below 1 - eps_low = 0.8, so -A * 0.8 = 0.8 wins
    logp, old = _logp_pair([0.78])
    loss, n = policy_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64), eps_low=0.2, eps_high=0.28)
    assert loss.item() == pytest.approx(0.8) and n.item() == 1
    # with eps_low = 0.25 the same token is inside the range: loss -A * r = 0.78
    loss, n = policy_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64), eps_low=0.25, eps_high=0.28)
    assert loss.item() == pytest.approx(0.78) and n.item() == 0


def test_policy_loss_at_ratio_one_is_minus_sum_of_advantages():
    logp = torch.tensor([-0.3, -2.0, -1.1])
    adv = torch.tensor([0.5, -1.5, 2.0])
    loss, n = policy_loss(logp, logp.clone(), adv, eps_low=0.2, eps_high=0.2)
    assert loss.item() == pytest.approx(-(0.5 - 1.5 + 2.0), abs=1e-6)
    assert n.item() == 0


# --------------------------------------------------------------------------- kl_penalty

def test_kl_k1_k2_k3_hand_values():
    d = torch.tensor([LN2, -LN2, 0.0], dtype=torch.float64)
    ref = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    logp = ref + d
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([LN2, -LN2, 0.0], abs=1e-12)
    assert kl_penalty(logp, ref, "k2").tolist() == pytest.approx([0.5 * LN2**2, 0.5 * LN2**2, 0.0], abs=1e-12)
    # k3 = exp(-d) + d - 1: d = ln 2 -> 1/2 + ln 2 - 1; d = -ln 2 -> 2 - ln 2 - 1
    k3 = [LN2 - 0.5, 1.0 - LN2, 0.0]
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx(k3, abs=1e-12)
    assert kl_penalty(logp, ref, "low_var_kl").tolist() == pytest.approx(k3, abs=1e-12)


def test_k3_is_non_negative():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(1000, generator=gen, dtype=torch.float64) * 3
    ref = torch.randn(1000, generator=gen, dtype=torch.float64) * 3
    for kind in ("k3", "low_var_kl"):
        assert (kl_penalty(logp, ref, kind) >= 0).all()
    # k1 is not: it is negative wherever logp < ref
    assert (kl_penalty(logp, ref, "k1") < 0).any()


def test_low_var_kl_is_clamped_at_extreme_log_ratios():
    ref = torch.zeros(5, dtype=torch.float64)
    d = torch.tensor([-100.0, -30.0, 5.0, 12.0, 30.0], dtype=torch.float64)
    logp = (ref + d).requires_grad_(True)
    k3 = kl_penalty(logp.detach(), ref, "k3")
    # unclamped k3: exp(100) + ..., exp(30) - 31, exp(-5) + 4, exp(-12) + 11, exp(-30) + 29
    assert k3[1].item() == pytest.approx(math.exp(30) - 31, rel=1e-12)
    assert k3[3].item() == pytest.approx(math.exp(-12) + 11, rel=1e-12)
    assert k3[4].item() == pytest.approx(29.0, rel=1e-12)
    low = kl_penalty(logp, ref, "low_var_kl")
    assert low.tolist() == pytest.approx([10.0, 10.0, math.exp(-5) + 4, 10.0, 10.0], abs=1e-12)
    low.sum().backward()
    assert torch.isfinite(logp.grad).all()
    # fp32 without clamping overflows; low_var_kl stays finite
    ref32, logp32 = torch.zeros(1), torch.tensor([-100.0])
    assert torch.isinf(kl_penalty(logp32, ref32, "k3")).all()
    assert kl_penalty(logp32, ref32, "low_var_kl").item() == 10.0


# --------------------------------------------------------------------------- token_logprobs_and_entropy

def _softmax(row):
    exps = [math.exp(x) for x in row]
    z = sum(exps)
    return [e / z for e in exps]


def test_logprobs_match_explicit_softmax_and_padding_is_ignored():
    rows = [[1.0, 2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0], [-1.0, 4.0, 0.0, 2.0]]
    # two padding columns with large logits that would dominate the softmax if kept
    padded = torch.tensor([r + [50.0, 40.0] for r in rows])
    targets = torch.tensor([2, 1, 3])
    logp, ent = token_logprobs_and_entropy(padded, targets, vocab_size=4)
    assert logp.dtype == torch.float32 and logp.shape == (3,) and ent.shape == (3,)
    for i, row in enumerate(rows):
        p = _softmax(row)
        assert logp[i].item() == pytest.approx(math.log(p[targets[i]]), abs=1e-6)
        assert ent[i].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-6)
    # uniform over 4 tokens: log p = -ln 4, entropy = ln 4
    assert logp[1].item() == pytest.approx(-math.log(4), abs=1e-6)
    assert ent[1].item() == pytest.approx(math.log(4), abs=1e-6)


def test_temperature_divides_logits():
    # logits [2, 0] at T = 2 are [1, 0]: p(0) = e / (e + 1)
    logits = torch.tensor([[2.0, 0.0, 9.0]])  # third column is padding
    logp, ent = token_logprobs_and_entropy(logits, torch.tensor([0]), vocab_size=2, temperature=2.0)
    p0 = math.e / (math.e + 1)
    assert logp.item() == pytest.approx(math.log(p0), abs=1e-6)
    assert ent.item() == pytest.approx(-(p0 * math.log(p0) + (1 - p0) * math.log(1 - p0)), abs=1e-6)
    logp1, _ = token_logprobs_and_entropy(logits, torch.tensor([0]), vocab_size=2, temperature=1.0)
    assert logp1.item() == pytest.approx(math.log(_softmax([2.0, 0.0])[0]), abs=1e-6)


def test_half_precision_logits_give_fp32_results():
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    logp, ent = token_logprobs_and_entropy(logits, torch.tensor([0]), vocab_size=3)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert logp.item() == pytest.approx(math.log(_softmax([1.0, 2.0, 3.0])[0]), abs=1e-6)


def test_logprob_gradient_is_onehot_minus_softmax_and_zero_on_padding():
    row = [0.5, -1.0, 2.0]
    logits = torch.tensor([row + [30.0]], requires_grad=True)
    logp, _ = token_logprobs_and_entropy(logits, torch.tensor([1]), vocab_size=3)
    logp.sum().backward()
    p = _softmax(row)
    assert logits.grad[0].tolist() == pytest.approx([-p[0], 1 - p[1], -p[2], 0.0], abs=1e-6)


def test_entropy_carries_gradient_only_with_entropy():
    row = [0.5, -1.0, 2.0]
    logits = torch.tensor([row + [7.0]], requires_grad=True)
    _, ent = token_logprobs_and_entropy(logits, torch.tensor([0]), vocab_size=3)
    assert not ent.requires_grad  # a metric only
    _, ent = token_logprobs_and_entropy(logits, torch.tensor([0]), vocab_size=3, with_entropy=True)
    assert ent.requires_grad
    ent.sum().backward()
    # dH/dz_j = -p_j (log p_j + H)
    p = _softmax(row)
    h = -sum(q * math.log(q) for q in p)
    expected = [-q * (math.log(q) + h) for q in p] + [0.0]
    assert logits.grad[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_batched_shape_is_kept():
    logits = torch.zeros(2, 5, 6)
    logp, ent = token_logprobs_and_entropy(logits, torch.zeros(2, 5, dtype=torch.long), vocab_size=4)
    assert logp.shape == (2, 5) and ent.shape == (2, 5)
    assert torch.allclose(logp, torch.full((2, 5), -math.log(4)))
    assert torch.allclose(ent, torch.full((2, 5), math.log(4)))
