"""The training side of the RL loop: one Ray actor per training process.

``MegatronTrainRayActor.init`` joins torch.distributed, builds the megatron-core policy with
LoRA inside (``initialize_model_and_optimizer``); ``train`` runs the policy-gradient update on
one rollout; ``export_weights`` hands the rollout engine what changed (with LoRA: the adapter
tensors only, in PEFT names); ``save``/``load`` write and restore checkpoints.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from slime.backends.megatron_utils.loss import (
    gather_full_vocab,
    kl_penalty,
    policy_loss,
    token_logprobs_and_entropy,
)
from slime.utils.errors import UserError


@dataclass
class MicroBatch:
    """Right-padded samples. ``tokens: [b, L]``; ``mask[i, j] = 1`` when ``tokens[i, j + 1]`` is a
    response token (logits at j predict token j + 1); ``rollout_logp`` aligned with ``mask``."""

    tokens: torch.Tensor
    mask: torch.Tensor
    rollout_logp: torch.Tensor
    advantages: torch.Tensor
    index: list[int]


def make_micro_batches(samples: list[int], data: dict, micro_batch_size: int,
                       max_tokens: int | None) -> list[MicroBatch]:
    """Group samples of similar length (less padding): ``micro_batch_size`` samples each, or as many
    as fit in ``max_tokens`` padded tokens when that is set."""
    order = sorted(samples, key=lambda i: len(data["tokens"][i]), reverse=True)
    groups: list[list[int]] = []
    for i in order:
        current = groups[-1] if groups else None
        if current is None:
            fits = False
        elif max_tokens is not None:  # sorted longest first: the group's width is its first sample's
            fits = len(data["tokens"][current[0]]) * (len(current) + 1) <= max_tokens
        else:
            fits = len(current) < micro_batch_size
        if fits:
            current.append(i)
        else:
            groups.append([i])
    return [_collate(g, data) for g in groups]


def _collate(index: list[int], data: dict) -> MicroBatch:
    width = max(len(data["tokens"][i]) for i in index)
    tokens = torch.zeros(len(index), width, dtype=torch.long)
    mask = torch.zeros(len(index), width - 1)
    rollout_logp = torch.zeros(len(index), width - 1)
    for row, i in enumerate(index):
        seq, prompt_len = data["tokens"][i], data["prompt_lens"][i]
        tokens[row, : len(seq)] = torch.tensor(seq)
        n = len(seq) - prompt_len
        mask[row, prompt_len - 1: len(seq) - 1] = 1.0
        rollout_logp[row, prompt_len - 1: prompt_len - 1 + n] = torch.tensor(data["rollout_logprobs"][i][:n])
    advantages = torch.tensor([data["advantages"][i] for i in index], dtype=torch.float32)
    return MicroBatch(tokens, mask, rollout_logp, advantages, index)


class MegatronTrainRayActor:
    """A training process (one bundle). Constructed by :class:`slime.ray.actor_group.RayActorGroup`."""

    def __init__(self, *, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    # ------------------------------------------------------------------ setup

    def init(self, args: argparse.Namespace, role: str = "actor") -> dict:
        from megatron.core import parallel_state

        from slime.backends.megatron_utils.model import initialize_model_and_optimizer
        from slime.backends.megatron_utils.parallel import init_parallel

        torch.set_num_threads(max(1, int(os.environ.get("SLIME_TRAIN_THREADS", torch.get_num_threads()))))
        if args.pipeline_model_parallel_size > 1:
            raise UserError("--pipeline-model-parallel-size > 1: the RL trainer runs TP x DP only; use TP or more DP")
        init_parallel(self.rank, self.world_size, tensor_parallel=args.tensor_model_parallel_size,
                      pipeline_parallel=args.pipeline_model_parallel_size, seed=args.seed)
        self.args = args
        built = initialize_model_and_optimizer(args, role)
        self.model, self.optimizer, self.arch = built.model, built.optimizer, built.arch
        self.ref_model: list[nn.Module] | None = None
        if args.use_kl_loss and not args.use_lora:
            self.ref_model = initialize_model_and_optimizer(args, role="ref").model
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()
        return {"pid": os.getpid(), "trainable": sum(p.numel() for p in self.optimizer.params)}

    # ------------------------------------------------------------------ forward

    def _logprobs(self, model: list[nn.Module], mb: MicroBatch, entropy: bool = False):
        tokens = mb.tokens
        inputs = tokens[:, :-1]
        position_ids = torch.arange(inputs.shape[1]).expand_as(inputs)
        logits = gather_full_vocab(model[0](inputs, position_ids, None))
        return token_logprobs_and_entropy(logits, tokens[:, 1:], self.arch.vocab_size, self.args.rollout_temperature,
                                          with_entropy=entropy)

    @torch.no_grad()
    def _reference_logprobs(self, mb: MicroBatch) -> torch.Tensor:
        """The reference policy: with LoRA, this very model with adapters off (no second copy)."""
        if self.ref_model is not None:
            return self._logprobs(self.ref_model, mb)[0]
        from slime_plugins.lora.lora_layer import disable_adapters

        with disable_adapters(self.model):
            return self._logprobs(self.model, mb)[0]

    # ------------------------------------------------------------------ train

    def train(self, rollout_id: int, data: dict) -> dict:
        """One rollout's update: ``len(tokens) / global_batch_size`` optimizer steps.

        ``data`` holds, per sample (grouped by prompt): ``tokens`` (prompt + response ids),
        ``prompt_lens``, ``rollout_logprobs`` (one per response token) and ``advantages``.
        Before any update, the trainer's log-probs are compared with the rollout engine's.
        """
        args = self.args
        start = time.time()
        for chunk in self.model:
            chunk.train()
        n = len(data["tokens"])
        steps = max(1, n // args.global_batch_size)
        step_size = n // steps
        totals = torch.zeros(7, dtype=torch.float64)  # loss, kl, entropy, gap, clipped, tokens, gap_tokens
        grad_norms = []
        for step in range(steps):
            mine = [i for i in range(step * step_size, (step + 1) * step_size) if i % self.dp_size == self.dp_rank]
            batches = make_micro_batches(mine, data, args.micro_batch_size, args.max_tokens_per_micro_batch)
            if steps > 1 and step == 0:
                # The policy moves after step 0: measure the gap and take old log-probs for all
                # samples now, with one no-grad pass.
                self._old_logp = self._no_grad_logprobs(data, totals)
            local_tokens = sum(float(mb.mask.sum()) for mb in batches)
            step_tokens = self._dp_sum(torch.tensor([local_tokens]))[0].item()
            self.optimizer.zero_grad()
            for mb in batches:
                self._train_micro_batch(mb, step_tokens, steps, totals)
            norm, lr = self.optimizer.step()
            grad_norms.append(norm)
        totals = self._dp_sum(totals)
        loss, kl, ent, gap, clipped, tokens, gap_tokens = totals.tolist()
        metrics = {
            "train/loss": loss / max(tokens, 1), "train/entropy": ent / max(tokens, 1),
            "train/rollout_logprob_abs_diff": gap / max(gap_tokens, 1), "train/clipfrac": clipped / max(tokens, 1),
            "train/grad_norm": sum(grad_norms) / len(grad_norms), "train/lr": lr, "train/steps": steps,
            "perf/train_seconds": time.time() - start,
        }
        if args.use_kl_loss:
            metrics["train/kl"] = kl / max(tokens, 1)
        self._check_gap(rollout_id, metrics["train/rollout_logprob_abs_diff"])
        return metrics

    def _train_micro_batch(self, mb: MicroBatch, step_tokens: float, steps: int, totals: torch.Tensor) -> None:
        args = self.args
        ref_logp = self._reference_logprobs(mb) if args.use_kl_loss else None
        logp, entropy = self._logprobs(self.model, mb, entropy=args.entropy_coef > 0)
        mask = mb.mask
        if steps == 1:
            old_logp = logp.detach()  # one update per rollout: ratio is 1, no second forward needed
            totals[3] += float(((logp.detach() - mb.rollout_logp).abs() * mask).sum())
            totals[6] += float(mask.sum())
        else:
            old_logp = self._old_logp_for(mb)
        pg, clipped = policy_loss(logp, old_logp, mb.advantages, mask, args.eps_clip, args.eps_clip_high)
        loss = pg
        if ref_logp is not None:
            kl = (kl_penalty(logp, ref_logp, args.kl_loss_type) * mask).sum()
            loss = loss + args.kl_loss_coef * kl
            totals[1] += float(kl.detach())
        if args.entropy_coef > 0:
            loss = loss - args.entropy_coef * (entropy * mask).sum()
        # Token mean over the global step; the optimizer averages over DP ranks, so undo that.
        (loss * self.dp_size / max(step_tokens, 1.0)).backward()
        totals[0] += float(pg.detach())
        totals[2] += float((entropy.detach() * mask).sum())
        totals[4] += float(clipped)
        totals[5] += float(mask.sum())

    @torch.no_grad()
    def _no_grad_logprobs(self, data: dict, totals: torch.Tensor) -> dict[int, torch.Tensor]:
        mine = [i for i in range(len(data["tokens"])) if i % self.dp_size == self.dp_rank]
        old = {}
        for mb in make_micro_batches(mine, data, self.args.micro_batch_size, self.args.max_tokens_per_micro_batch):
            logp = self._logprobs(self.model, mb)[0]
            totals[3] += float(((logp - mb.rollout_logp).abs() * mb.mask).sum())
            totals[6] += float(mb.mask.sum())
            for row, i in enumerate(mb.index):
                old[i] = logp[row]
        return old

    def _old_logp_for(self, mb: MicroBatch) -> torch.Tensor:
        width = mb.tokens.shape[1] - 1
        return torch.stack([self._old_logp[i][:width] for i in mb.index])

    def _dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and self.dp_size > 1:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def _check_gap(self, rollout_id: int, gap: float) -> None:
        bound = self.args.check_logprob_gap
        if bound and gap > bound:
            raise UserError(
                f"rollout {rollout_id}: mean |logp_rollout - logp_train| = {gap:.3g} exceeds --check-logprob-gap "
                f"{bound:g}: the rollout engine is not sampling from the trained weights (stale adapter or weights?)"
            )

    # ------------------------------------------------------------------ sync and checkpoints

    def export_weights(self) -> tuple[dict[str, torch.Tensor], dict | None] | None:
        """What the rollout engine needs after an update (collective; rank 0 returns it).

        With LoRA: the PEFT adapter tensors and config (a few MB). Without: the full HF weights.
        """
        if self.args.use_lora:
            from slime_plugins.lora.peft_io import adapter_state_tensors

            tensors, config = adapter_state_tensors(self.model, self.arch, self.args)
        else:
            from slime.backends.megatron_utils.hf_convert import export_hf_weights

            tensors, config = export_hf_weights(self.model, self.arch), None
        return (tensors, config) if self.rank == 0 else None

    def save(self, iteration: int, extra_state: dict) -> None:
        from slime.backends.megatron_utils.checkpoint import save_checkpoint

        save_checkpoint(self.args.save, iteration, self.model, self.arch, self.args, self.optimizer, extra_state)

    def load(self) -> tuple[int, dict]:
        from slime.backends.megatron_utils.checkpoint import load_checkpoint

        return load_checkpoint(self.args.load, self.model, self.arch, self.args, self.optimizer)
