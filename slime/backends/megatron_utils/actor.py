"""The training side of the RL loop: one Ray actor per training process.

``MegatronTrainRayActor.init`` joins torch.distributed, builds the megatron-core policy with
LoRA inside (``initialize_model_and_optimizer``); ``train`` runs the policy-gradient update on
one rollout; ``export_weights`` hands the rollout engine what changed (with LoRA: the adapter
tensors only, in PEFT names); ``save``/``load`` write and restore checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from slime.backends.megatron_utils.loss import (
    kl_penalty,
    policy_loss,
    token_logprobs_and_entropy,
)
from slime.backends.megatron_utils.packing import (
    PackedBatch,
    collate,
    group_rows,
    logits_only_at,
    plan_micro_batches,
    row_width,
    rope_at_positions,
)
from slime.backends.megatron_utils.parallel import expert_groups, gather_vocab
from slime.backends.megatron_utils.pipeline import configure_for_pipeline, is_last_stage, run_pipeline
from slime.backends.megatron_utils.policy_versions import PolicyVersions
from slime.rollout.batch import RolloutBatch
from slime.utils.errors import UserError
from slime.utils.failpoints import failpoint


class Totals:
    """Slots of the float64 ``[SIZE]`` tensor of one rollout's sums (this rank's, then over DP).

    Summed over response tokens: ``LOSS`` (policy-gradient loss), ``KL``, ``ENTROPY``,
    ``CLIPPED`` (tokens where clipping bit), ``TOKENS``; ``GAP`` sums ``|logp - logp_rollout|``
    over the ``GAP_TOKENS`` tokens where the rollout-vs-trainer gap is measured.
    """

    LOSS, KL, ENTROPY, GAP, CLIPPED, TOKENS, GAP_TOKENS = range(7)
    SIZE = 7


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
        init_parallel(self.rank, self.world_size, tensor_parallel=args.tensor_model_parallel_size,
                      pipeline_parallel=args.pipeline_model_parallel_size,
                      expert_parallel=args.expert_model_parallel_size, seed=args.seed)
        self.args = args
        built = initialize_model_and_optimizer(args, role)
        self.model, self.optimizers, self.arch = built.model, built.optimizers, built.arch
        self.optimizer = built.optimizer if not args.tasks else None
        # One RNG stream per task (dropout masks), each starting where a one-task run's would.
        self.task_rng = {t.name: torch.get_rng_state() for t in args.tasks}
        # The trainer version: rollouts trained so far (the engines' weights carry the version they came from).
        self.version = 0
        self.versions = self._policy_versions(args)
        self.ref_model: list[nn.Module] | None = None
        if args.use_kl_loss and not args.use_lora:
            self.ref_model = initialize_model_and_optimizer(args, role="ref").model
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        if self.pp_size > 1:
            configure_for_pipeline(self.model)
        self.dp_group = parallel_state.get_data_parallel_group()
        return {"pid": os.getpid(), "trainable": sum(p.numel() for o in self.optimizers.values() for p in o.params)}

    # ------------------------------------------------------------------ forward

    def _logprobs(self, model: list[nn.Module], mb: PackedBatch, entropy: bool = False):
        """Log-probs and entropies ``[T]`` of the micro-batch's response tokens at the rollout temperature."""
        with rope_at_positions(model[0], mb.position_ids), logits_only_at(model[0], mb.pred_row, mb.pred_col):
            logits = model[0](mb.tokens, mb.position_ids, mb.attention_mask)  # [T, 1, V/tp]
        return self._from_logits(mb, gather_vocab(logits[:, 0]), entropy)

    def _from_logits(self, mb: PackedBatch, logits: torch.Tensor, entropy: bool = False):
        """``[T, V_padded]`` logits -> log-probs and entropies ``[T]`` at the rollout temperature."""
        return token_logprobs_and_entropy(logits, mb.targets, self.arch.vocab_size, self.args.rollout_temperature,
                                          with_entropy=entropy)

    def _pipelined_logprobs(self, batches: list[PackedBatch], adapters_off: bool = False) -> list[torch.Tensor | None]:
        """Per micro-batch, the ``[T]`` log-probs on the last pipeline stage (``None`` elsewhere), no grad."""
        from slime_plugins.lora.lora_layer import disable_adapters

        out: list[torch.Tensor | None] = [None] * len(batches)

        def keep(index: int, mb: PackedBatch, logits: torch.Tensor) -> torch.Tensor:
            out[index] = self._from_logits(mb, logits)[0]
            return logits.new_zeros(())

        with disable_adapters(self.model) if adapters_off else contextlib.nullcontext():
            run_pipeline(self.model, batches, keep, forward_only=True)
        return out

    def _micro_batches(self, samples: list[int], batch: RolloutBatch) -> list[PackedBatch]:
        groups = group_rows(samples, batch)
        plan = plan_micro_batches(groups, batch, self.args.micro_batch_size, self.args.max_tokens_per_micro_batch)
        # Sequence parallelism splits every row into TP equal slices of the sequence.
        tp = self.args.tensor_model_parallel_size
        multiple = tp if self.args.sequence_parallel and tp > 1 else 1
        count, num_rows, width = self._expert_parallel_shape(plan, batch, multiple)
        plan = plan + [[]] * (count - len(plan))
        return [collate(rows, batch, width_multiple=multiple, width=width, num_rows=num_rows) for rows in plan]

    def _expert_parallel_shape(self, plan: list[list[list[int]]], batch: RolloutBatch,
                               multiple: int) -> tuple[int, int, int]:
        """(micro-batches, rows, width) every rank of the expert-parallel group must run: each MoE
        layer all-gathers the group's tokens, so all run the same number of forwards and backwards
        of one shape (the largest; padding rows, and padding-only micro-batches, carry no tokens).
        ``(len(plan), 0, 0)``, no padding, without expert parallelism."""
        group = expert_groups()[0]
        if group is None or dist.get_world_size(group) == 1:
            return len(plan), 0, 0
        widths = [-(-max(row_width(g, batch) for g in rows) // multiple) * multiple for rows in plan]
        local = torch.tensor([len(plan), max(map(len, plan), default=0), max(widths, default=0)])
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        return tuple(int(v) for v in local)

    def _my_samples(self, samples: range, batch: RolloutBatch) -> list[int]:
        """This DP rank's share: whole groups (``batch.group_ids``), round robin."""
        groups = group_rows(list(samples), batch)
        return [i for g, group in enumerate(groups) if g % self.dp_size == self.dp_rank for i in group]

    @torch.no_grad()
    def _reference_logprobs(self, mb: PackedBatch) -> torch.Tensor:
        """The reference policy: with LoRA, this very model with adapters off (no second copy)."""
        if self.ref_model is not None:
            return self._logprobs(self.ref_model, mb)[0]
        from slime_plugins.lora.lora_layer import disable_adapters

        with disable_adapters(self.model):
            return self._logprobs(self.model, mb)[0]

    # ------------------------------------------------------------------ train

    def _policy_versions(self, args: argparse.Namespace) -> PolicyVersions | None:
        """With ``--async-rollout``, the adapters of the versions rollouts may still come from."""
        if not args.async_rollout:
            return None
        from slime_plugins.lora.lora_layer import all_adapter_parameters

        return PolicyVersions(all_adapter_parameters(self.model), keep=args.max_staleness)

    def train(self, rollout_id: int, batch: RolloutBatch) -> dict:
        """One rollout's update; with ``--lora-tasks``, one per task, each on that task's samples
        through that task's adapter, optimizer and RNG stream (metrics prefixed ``<task>/``)."""
        if self.rank == 0:
            failpoint("trainer.train")
        try:
            return self._train_tasks(rollout_id, batch)
        finally:
            self.version += 1

    def _train_tasks(self, rollout_id: int, batch: RolloutBatch) -> dict:
        if not self.args.tasks:
            return self._train_adapter(rollout_id, batch, self.optimizer)
        from slime_plugins.lora.lora_layer import use_adapter

        start, metrics = time.time(), {}
        for task in self.args.tasks:
            torch.set_rng_state(self.task_rng[task.name])
            with use_adapter(self.model, task.name):
                task_metrics = self._train_adapter(rollout_id, batch.task_batch(task.name), self.optimizers[task.name],
                                                   task=task.name)
            self.task_rng[task.name] = torch.get_rng_state()
            metrics |= {f"{task.name}/{k}": v for k, v in task_metrics.items() if not k.startswith("perf/")}
        metrics["perf/train_seconds"] = time.time() - start
        return metrics

    def _train_adapter(self, rollout_id: int, batch: RolloutBatch, optimizer, task: str | None = None) -> dict:
        """``N / global_batch_size`` optimizer steps of ``optimizer`` over the ``N`` samples of ``batch``.

        Step ``s`` trains samples ``[s N / steps, (s + 1) N / steps)``, split over DP ranks by whole
        groups.  Before any update, the trainer's log-probs are compared with the rollout engine's.
        """
        args = self.args
        start = time.time()
        for chunk in self.model:
            chunk.train()
        n = len(batch)
        steps = max(1, n // args.global_batch_size)
        step_size = n // steps
        totals = torch.zeros(Totals.SIZE, dtype=torch.float64)
        grad_norms = []
        old_logp = None
        lag = self.versions.staleness(batch.policy_version, self.version) if self.versions else 0
        for step in range(steps):
            mine = self._my_samples(range(step * step_size, (step + 1) * step_size), batch)
            batches = self._micro_batches(mine, batch)
            if (steps > 1 or lag) and step == 0:
                # The policy moves after step 0, or moved since the rollout was sampled: measure the
                # gap and take old log-probs (of the version that sampled) with one no-grad pass.
                with self.versions.weights_of(batch.policy_version) if lag else contextlib.nullcontext():
                    old_logp = self._no_grad_logprobs(batch, totals)
            local_tokens = float(sum(mb.num_tokens for mb in batches))
            step_tokens = self._dp_sum(torch.tensor([local_tokens]))[0].item()
            optimizer.zero_grad()
            if self.pp_size > 1:
                self._train_step_pipelined(batches, step_tokens, old_logp, totals)
            else:
                for mb in batches:
                    self._train_micro_batch(mb, step_tokens, old_logp, totals)
            norm, lr = optimizer.step()
            grad_norms.append(norm)
        totals = self._dp_sum(self._pp_sum(totals))
        loss, kl, ent, gap, clipped, tokens, gap_tokens = totals.tolist()  # in Totals' order
        metrics = {
            "train/loss": loss / max(tokens, 1), "train/entropy": ent / max(tokens, 1),
            "train/rollout_logprob_abs_diff": gap / max(gap_tokens, 1), "train/clipfrac": clipped / max(tokens, 1),
            "train/grad_norm": sum(grad_norms) / len(grad_norms), "train/lr": lr, "train/steps": steps,
            "perf/train_seconds": time.time() - start,
        }
        if args.use_kl_loss:
            metrics["train/kl"] = kl / max(tokens, 1)
        if self.versions:
            metrics["train/staleness"] = lag
        self._check_gap(rollout_id, metrics["train/rollout_logprob_abs_diff"], task)
        return metrics

    def _train_micro_batch(self, mb: PackedBatch, step_tokens: float, old_logp: dict[int, torch.Tensor] | None,
                           totals: torch.Tensor) -> None:
        """Accumulate one micro-batch's gradient (the loss of ``slime.backends.megatron_utils.loss``).

        ``old_logp``: per sample index, the ``[L_i]`` log-probs of the policy that generated the
        rollout; None when the rollout is one optimizer step (then they are this forward's, detached).
        ``totals``: the ``[Totals.SIZE]`` sums, added to in place.
        """
        ref_logp = self._reference_logprobs(mb) if self.args.use_kl_loss else None
        logp, entropy = self._logprobs(self.model, mb, entropy=self.args.entropy_coef > 0)
        self._micro_batch_loss(mb, logp, entropy, ref_logp, step_tokens, old_logp, totals).backward()

    def _train_step_pipelined(self, batches: list[PackedBatch], step_tokens: float,
                              old_logp: dict[int, torch.Tensor] | None, totals: torch.Tensor) -> None:
        """One step's micro-batches through the pipeline: the reference log-probs first (a forward-only
        pass with adapters off), then the 1F1B forward and backward; losses on the last stage."""
        ref = self._pipelined_logprobs(batches, adapters_off=True) if self.args.use_kl_loss else [None] * len(batches)

        def loss(index: int, mb: PackedBatch, logits: torch.Tensor) -> torch.Tensor:
            logp, entropy = self._from_logits(mb, logits, entropy=self.args.entropy_coef > 0)
            return self._micro_batch_loss(mb, logp, entropy, ref[index], step_tokens, old_logp, totals)

        run_pipeline(self.model, batches, loss)

    def _micro_batch_loss(self, mb: PackedBatch, logp: torch.Tensor, entropy: torch.Tensor,
                          ref_logp: torch.Tensor | None, step_tokens: float,
                          old_logp: dict[int, torch.Tensor] | None, totals: torch.Tensor) -> torch.Tensor:
        """The micro-batch's share of the step's loss, from its ``[T]`` log-probs; adds to ``totals``."""
        args = self.args
        if old_logp is None:
            mb_old_logp = logp.detach()  # one update per rollout: ratio is 1, no second forward needed
            totals[Totals.GAP] += float((logp.detach() - mb.rollout_logp).abs().sum())
            totals[Totals.GAP_TOKENS] += mb.num_tokens
        else:
            mb_old_logp = torch.cat([old_logp[i] for i in mb.index] or [logp.detach()])
        pg, clipped = policy_loss(logp, mb_old_logp, mb.advantages, args.eps_clip, args.eps_clip_high)
        loss = pg
        if ref_logp is not None:
            kl = kl_penalty(logp, ref_logp, args.kl_loss_type).sum()
            loss = loss + args.kl_loss_coef * kl
            totals[Totals.KL] += float(kl.detach())
        if args.entropy_coef > 0:
            loss = loss - args.entropy_coef * entropy.sum()
        totals[Totals.LOSS] += float(pg.detach())
        totals[Totals.ENTROPY] += float(entropy.detach().sum())
        totals[Totals.CLIPPED] += float(clipped)
        totals[Totals.TOKENS] += mb.num_tokens
        # Token mean over the global step; the optimizer averages over DP ranks, so undo that.
        return loss * self.dp_size / max(step_tokens, 1.0)

    @torch.no_grad()
    def _no_grad_logprobs(self, batch: RolloutBatch, totals: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per sample index, the current policy's ``[L_i]`` log-probs (old log-probs when a rollout
        takes several steps); adds the rollout-vs-trainer gap to ``totals``."""
        old = {}
        batches = self._micro_batches(self._my_samples(range(len(batch)), batch), batch)
        if self.pp_size > 1:
            pipelined = self._pipelined_logprobs(batches)
            if not is_last_stage():
                return old  # only the last stage computes losses, hence needs old log-probs
        for n, mb in enumerate(batches):
            logp = pipelined[n] if self.pp_size > 1 else self._logprobs(self.model, mb)[0]
            totals[Totals.GAP] += float((logp - mb.rollout_logp).abs().sum())
            totals[Totals.GAP_TOKENS] += mb.num_tokens
            for local, i in enumerate(mb.index):
                old[i] = logp[mb.sample == local]
        return old

    def _pp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over pipeline stages: the last one computed every total, the others hold zeros."""
        if self.pp_size == 1:
            return t
        from megatron.core import parallel_state

        group = parallel_state.get_pipeline_model_parallel_group()
        on_device = t.cuda() if dist.get_backend(group) == "nccl" else t
        dist.all_reduce(on_device, group=group)
        return on_device.cpu()

    def _dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks (NCCL reduces only CUDA tensors: the sum goes via the GPU)."""
        if dist.is_initialized() and self.dp_size > 1:
            on_device = t.cuda() if dist.get_backend(self.dp_group) == "nccl" else t
            dist.all_reduce(on_device, group=self.dp_group)
            return on_device.cpu()
        return t

    def _check_gap(self, rollout_id: int, gap: float, task: str | None = None) -> None:
        bound = self.args.check_logprob_gap
        if bound and gap > bound:
            where = f"rollout {rollout_id}" + (f", task '{task}'" if task else "")
            raise UserError(
                f"{where}: mean |logp_rollout - logp_train| = {gap:.3g} exceeds --check-logprob-gap "
                f"{bound:g}: the rollout engine is not sampling from the trained weights (stale adapter or weights?)"
            )

    # ------------------------------------------------------------------ sync and checkpoints

    def export_weights(self, task: str | None = None) -> tuple[dict[str, torch.Tensor], dict | None] | None:
        """What the rollout engine needs after an update (collective; rank 0 returns it).

        With LoRA: the PEFT adapter tensors and config (a few MB) of the adapter, or of ``task``'s
        adapter with ``--lora-tasks``. Without: the full HF weights.
        """
        if self.versions:
            self.versions.record(self.version)
        if self.args.use_lora:
            from slime_plugins.lora.lora_layer import use_adapter
            from slime_plugins.lora.peft_io import adapter_state_tensors

            spec = next((t for t in self.args.tasks if t.name == task), None)
            with use_adapter(self.model, task) if spec else contextlib.nullcontext():
                tensors, config = adapter_state_tensors(self.model, self.arch, spec.lora if spec else self.args.lora,
                                                        self.args.hf_checkpoint)
        else:
            from slime.backends.megatron_utils.hf_convert import export_hf_weights

            tensors, config = export_hf_weights(self.model, self.arch), None
        return (tensors, config) if self.rank == 0 else None

    def save(self, iteration: int, extra_state: dict) -> None:
        from slime.backends.megatron_utils.checkpoint import save_checkpoint

        save_checkpoint(self.args.save, iteration, self.model, self.arch, self.args, self.optimizers, extra_state,
                        rng_streams=self.task_rng)

    def load(self) -> tuple[int, dict]:
        from slime.backends.megatron_utils.checkpoint import load_checkpoint

        iteration, state = load_checkpoint(self.args.load, self.model, self.arch, self.args, self.optimizers,
                                           rng_streams=self.task_rng)
        self.version = iteration + 1
        return iteration, state
