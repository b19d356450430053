"""What a rollout hands the trainer: scored samples that keep their prompt groups."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch

from slime.rollout.data import Sample


def repeat_prompts(prompts: Sequence[Sample], n: int) -> list[Sample]:
    """Each prompt ``n`` times in a row (shallow copies), with ``group_index`` its prompt group.

    A prompt drawn twice in a row (a prompt file may repeat a prompt) continues the group, so
    the trainer packs all its samples into one row and computes the prompt once.
    """
    samples: list[Sample] = []
    group_index = -1
    for prompt in prompts:
        if not samples or samples[-1].prompt_token_ids != prompt.prompt_token_ids:
            group_index += 1
        for _ in range(n):
            sample = copy.copy(prompt)
            sample.group_index = group_index
            samples.append(sample)
    return samples


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


@dataclass
class RolloutBatch:
    """One rollout's training data, ``N`` samples; it crosses Ray from the driver to every trainer.

    Per sample ``i`` (every field is a length-``N`` list):

    * ``tokens[i]``: prompt + response ids, ``[P_i + L_i]``;
    * ``prompt_lens[i]``: ``P_i``, so the response is ``tokens[i][P_i:]``;
    * ``rollout_logprobs[i]``: ``[L_i]``, the engine's ``log_softmax(logits / T)`` of each response token;
    * ``advantages[i]``: one float, shared by every response token of the sample;
    * ``group_ids[i]``: the index of the sample's prompt group within the rollout;
    * ``tasks[i]`` (``--lora-tasks`` runs only, else ``None``): the task, i.e. the adapter that
      sampled it and trains on it.  A prompt group belongs to one task.

    ``policy_version`` is the trainer version whose weights sampled the rollout (the number of
    rollouts trained before its sync; ``None``: the trainer's current weights).  With
    ``--async-rollout`` it trails the trainer by up to ``--max-staleness``.

    A prompt group is a run of consecutive samples with the same prompt: the trainer packs it
    into one row (``slime.backends.megatron_utils.packing``) and hands whole groups to the
    data-parallel ranks.  Samples with one id are therefore consecutive and share one prompt.
    Advantages are normalised separately, over the ``n`` samples of each prompt draw
    (:func:`group_advantages`).
    """

    tokens: list[list[int]]
    prompt_lens: list[int]
    rollout_logprobs: list[list[float]]
    advantages: list[float]
    group_ids: list[int]
    tasks: list[str] | None = None
    policy_version: int | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        sizes = [len(self.prompt_lens), len(self.rollout_logprobs), len(self.advantages), len(self.group_ids)]
        if self.tasks is not None:
            sizes.append(len(self.tasks))
        if any(size != n for size in sizes):
            raise ValueError(f"RolloutBatch: {n} token lists but {sizes} prompt_lens, rollout_logprobs, "
                             "advantages, group_ids(, tasks)")
        closed: set[int] = set()
        for i in range(1, n):
            if self.group_ids[i] == self.group_ids[i - 1]:
                if self.prompt(i) != self.prompt(i - 1) or self.tasks and self.tasks[i] != self.tasks[i - 1]:
                    raise ValueError(f"RolloutBatch: samples {i - 1} and {i} share group {self.group_ids[i]} "
                                     "but not their prompt (or task)")
            else:
                closed.add(self.group_ids[i - 1])
                if self.group_ids[i] in closed:
                    raise ValueError(f"RolloutBatch: group {self.group_ids[i]} is not consecutive (sample {i})")

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], advantages: list[float],
                     tasks: list[str] | None = None, policy_version: int | None = None) -> RolloutBatch:
        """Rolled-out ``samples`` (response and ``group_index`` set) with one advantage each (and one task each)."""
        return cls(
            tokens=[s.prompt_token_ids + s.response_token_ids for s in samples],
            prompt_lens=[len(s.prompt_token_ids) for s in samples],
            rollout_logprobs=[s.rollout_logprobs for s in samples],
            advantages=advantages,
            group_ids=[s.group_index for s in samples],
            tasks=tasks,
            policy_version=policy_version,
        )

    def select(self, rows: Sequence[int]) -> RolloutBatch:
        """The samples ``rows`` (in that order) as a batch of their own, groups and tasks kept."""
        pick = lambda values: [values[i] for i in rows]  # noqa: E731
        return RolloutBatch(pick(self.tokens), pick(self.prompt_lens), pick(self.rollout_logprobs),
                            pick(self.advantages), pick(self.group_ids), pick(self.tasks) if self.tasks else None,
                            self.policy_version)

    def task_batch(self, task: str) -> RolloutBatch:
        """The samples of ``task``, in rollout order (empty when it has none)."""
        return self.select([i for i, t in enumerate(self.tasks or []) if t == task])

    def __len__(self) -> int:
        return len(self.tokens)

    def prompt(self, i: int) -> list[int]:
        """Sample ``i``'s prompt ids, ``[P_i]``."""
        return self.tokens[i][: self.prompt_lens[i]]

    def response(self, i: int) -> list[int]:
        """Sample ``i``'s response ids, ``[L_i]``."""
        return self.tokens[i][self.prompt_lens[i] :]
