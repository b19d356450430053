"""Which rollout engine ``--rollout-engine NAME`` runs, and how it is constructed.

:data:`ENGINES` maps each name to the ``module:Class`` path of a
:class:`slime.rollout.engine.RolloutEngine` implementation.  Adding an engine is one module
holding the class plus one entry here.  The class is imported only when chosen, so an
engine's dependencies are needed only by runs that use it.

Every engine is constructed as ``cls(**engine_kwargs(args))``, i.e. with

* ``hf_checkpoint_dir``: ``--hf-checkpoint``, the base model (HF layout);
* ``dtype``: ``torch.bfloat16`` with ``--bf16``, else ``torch.float32``;
* ``num_threads``: ``--rollout-num-threads``, default every CPU of the machine;
* ``merge_adapters``: ``--rollout-merge-lora``, fold the active adapter into the base weights.

An engine that has no use for one of them accepts and ignores it.  The vLLM engine also gets
``options``, its :class:`~slime.rollout.vllm_engine.VLLMOptions` from the ``--vllm-*`` flags.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
from typing import Any

import torch

from slime.utils.errors import UserError
from slime.utils.tasks import max_rank

ENGINES: dict[str, str] = {
    "hf": "slime.rollout.hf_engine:HFRolloutEngine",
    "vllm": "slime.rollout.vllm_engine:VLLMRolloutEngine",
}


def engine_class(name: str) -> type:
    """The engine class registered under ``name`` (imported now)."""
    if name not in ENGINES:
        raise UserError(f"--rollout-engine {name!r}: unknown; choose one of {sorted(ENGINES)}")
    module, _, attr = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The constructor arguments of every engine, from slime's flags (see the module docstring)."""
    kwargs: dict[str, Any] = {
        "hf_checkpoint_dir": args.hf_checkpoint,
        "dtype": torch.bfloat16 if args.bf16 else torch.float32,
        "num_threads": cpu_threads(args)[1],
        "merge_adapters": args.rollout_merge_lora,
    }
    if args.rollout_engine == "vllm":
        kwargs["options"] = vllm_options(args)
    return kwargs


def vllm_max_loras_error(args: argparse.Namespace) -> str | None:
    """Why ``--vllm-max-loras`` cannot serve the ``--lora-tasks`` adapters, or ``None``.

    Each adapter needs two slots: its new version is loaded before the old one is unloaded."""
    tasks = getattr(args, "tasks", None) or []
    need = 2 * len(tasks)
    if not tasks or args.rollout_engine != "vllm" or args.vllm_max_loras >= need:
        return None
    return (f"--vllm-max-loras {args.vllm_max_loras}: --lora-tasks {args.lora_tasks} has {len(tasks)} tasks and vLLM "
            f"holds two versions of each adapter while syncing; pass --vllm-max-loras {need} (or more)")


def vllm_moe_lora_error(is_moe: bool, on_gpu: bool) -> str | None:
    """Why ``--rollout-engine vllm`` cannot serve LoRA adapters of this model here, or ``None``.

    vLLM's LoRA on mixture-of-experts layers runs only as Triton fused-MoE kernels: on CPUs every
    forward pass of an MoE model with LoRA enabled fails."""
    if not is_moe or on_gpu:
        return None
    return ("--rollout-engine vllm: vLLM on CPUs cannot run LoRA on mixture-of-experts models (its fused-MoE LoRA "
            "kernels need a GPU); use --rollout-engine hf")


def vllm_options(args: argparse.Namespace) -> Any:
    """The vLLM engine's options from the ``--vllm-*`` flags (the adapter rank: the largest of ``args.lora``
    and every ``--lora-tasks`` task, :func:`slime.utils.tasks.max_rank`)."""
    from slime.rollout.vllm_engine import VLLMOptions

    problem = vllm_max_loras_error(args)
    if problem:
        raise UserError(problem)
    return VLLMOptions(
        python=args.vllm_python, start_timeout_s=args.vllm_start_timeout,
        request_timeout_s=args.actor_timeout or None, lora_rank=max_rank(args) if args.lora else 16,
        max_loras=args.vllm_max_loras, max_model_len=args.vllm_max_model_len, kv_cache_gib=args.vllm_kv_cache_gib,
        seed=args.seed, log_dir=args.log_dir, extra_args=shlex.split(args.vllm_extra_args or ""))


def cpu_threads(args: argparse.Namespace) -> tuple[int, int]:
    """(torch threads per training process, per rollout engine) on this machine's cores.

    Synchronous loop: each side has the machine while it runs (the trainers split it).  With
    ``--async-rollout`` both run at once, so the cores are split among the trainers and the
    engines: oversubscribed, their OpenMP threads spin against each other (measured on 2 cores:
    a rollout and a training step each 7-8x slower than alone).  ``--rollout-num-threads`` wins.
    """
    cores = os.cpu_count() or 1
    if args.async_rollout:
        share = max(1, cores // (args.world_size + args.rollout_num_engines))
        return share, args.rollout_num_threads or share
    return max(1, cores // args.world_size), args.rollout_num_threads or cores
