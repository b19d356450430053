"""Token log-probs and the clipped policy-gradient loss (advantages come with the rollout: slime.rollout.batch).

Notation per response token t of sample i: ``logp`` is log pi_theta(y_t | x, y_<t) at the
rollout temperature T (``log_softmax(logits / T)``, exactly what the rollout engine reports),
``old_logp`` the same under the policy that generated the rollout, ``ref_logp`` under the
reference policy (with LoRA: the same network with adapters disabled), ``A_i`` the advantage.

    ratio_t = exp(logp_t - old_logp_t)
    pg_t    = max(-A_i ratio_t, -A_i clip(ratio_t, 1 - eps_low, 1 + eps_high))
    loss    = sum_t (pg_t + beta kl_t - c_H H_t) / (response tokens in the global batch)

Averaging is token-level over the whole global batch (not per sample), as in DAPO/slime.
"""

from __future__ import annotations

import torch


def token_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                               temperature: float = 1.0, *, with_entropy: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and entropy of the predictive distribution.

    ``logits: [..., V_padded]`` (full vocabulary; columns past ``vocab_size`` are the TP
    padding and are dropped), ``targets: [...]``.  Returns two ``[...]`` fp32 tensors; the
    entropy carries a gradient only ``with_entropy`` (an entropy bonus), else it is a metric.
    """
    logits = logits[..., :vocab_size].float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lp = log_probs if with_entropy else log_probs.detach()
    entropy = -(lp.exp() * lp).sum(-1)
    return logp, entropy


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate of pi_theta from pi_ref (Schulman's k1/k2/k3)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    # k3 == low_var_kl: exp(-d) + d - 1 >= 0, unbiased with low variance; clamped for stability.
    neg = (-log_ratio).clamp(-20.0, 20.0) if kind == "low_var_kl" else -log_ratio
    kl = neg.exp() - neg - 1.0
    return kl.clamp(-10.0, 10.0) if kind == "low_var_kl" else kl


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed clipped surrogate, and the number of tokens where clipping bit.

    All arguments are per response token, ``[T]`` (each token carries its sample's advantage).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped).sum(), (clipped > unclipped).float().sum()
