"""The adapters of recent trainer versions, for rollouts sampled before the newest sync (``--async-rollout``).

With rollouts overlapped with training, rollout ``N + 1`` is generated with the weights of trainer
version ``v`` while the trainer steps from ``v`` to ``v + 1``; the trainer then trains on it at a
later version.  Its importance ratio must be taken against the policy that sampled it,

    ratio = pi_theta(y) / pi_v(y),

so the trainer keeps the adapter tensors of the versions it handed to the engines (a few MB each:
LoRA only) and swaps version ``v`` in for the no-grad pass that gives ``log pi_v`` and the
engine-vs-trainer gap of the version that sampled.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from slime.utils.errors import UserError


class PolicyVersions:
    """Copies of ``params`` (every adapter's ``A`` and ``B``) per recorded version, the last ``keep + 1``."""

    def __init__(self, params: list[nn.Parameter], keep: int) -> None:
        self.params = params
        self.keep = keep
        self._saved: dict[int, list[torch.Tensor]] = {}

    def record(self, version: int) -> None:
        """Keep the current tensors as ``version`` (what the engines receive now); drop the too old."""
        self._saved[version] = [p.detach().clone() for p in self.params]
        for old in [v for v in self._saved if v < version - self.keep]:
            del self._saved[old]

    def staleness(self, sampled_by: int | None, current: int) -> int:
        """How many versions a batch sampled by ``sampled_by`` trails ``current`` (0: sampled by it)."""
        if sampled_by is None or sampled_by == current:
            return 0
        lag = current - sampled_by
        if not 0 < lag <= self.keep or sampled_by not in self._saved:
            raise UserError(f"a rollout sampled by trainer version {sampled_by} reached the trainer at version "
                            f"{current}: more than --max-staleness {self.keep} behind (or ahead); this is a bug in "
                            "the rollout pipeline, rerun without --async-rollout")
        return lag

    @contextlib.contextmanager
    def weights_of(self, version: int) -> Iterator[None]:
        """Inside the block the adapters hold ``version``'s tensors; the current ones come back after."""
        current = [p.detach().clone() for p in self.params]
        _copy(self.params, self._saved[version])
        try:
            yield
        finally:
            _copy(self.params, current)


@torch.no_grad()
def _copy(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    for p, value in zip(params, values):
        p.copy_(value)
