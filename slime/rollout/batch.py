"""What a rollout hands the trainer: scored samples that keep their prompt groups."""

from __future__ import annotations

from typing import Sequence

import torch


def group_advantages(rewards: Sequence[float], group_size: int, estimator: str = "grpo") -> torch.Tensor:
    """One advantage per sample; samples of a prompt are ``group_size`` consecutive entries.

    grpo: ``(r - mean_g) / (std_g + 1e-6)``; dr_grpo: ``r - mean_g``; reinforce: ``r``.
    A group whose rewards are all equal gets zero advantage: it carries no signal.
    """
    r = torch.tensor(rewards, dtype=torch.float32)
    if estimator == "reinforce":
        return r
    groups = r.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if estimator == "grpo" and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + 1e-6)
    return centred.reshape(-1)
