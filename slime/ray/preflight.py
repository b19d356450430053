"""Start-up checks that need files or the machine (the flag checks live in arguments.py).

Run in the driver before Ray starts, so a bad path or an impossible layout costs nothing and
leaves nothing behind.  Every problem is collected, then raised as one UserError.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from slime.rollout.engines import ENGINES
from slime.utils.errors import raise_collected
from slime.utils.peft_format import CONFIG_NAME


def _path_errors(args: argparse.Namespace) -> list[str]:
    errors = []
    if args.hf_checkpoint is None:
        errors.append("--hf-checkpoint is required: a Hugging Face model directory (tools/prepare_model.py makes one)")
    elif not (Path(args.hf_checkpoint) / "config.json").is_file():
        errors.append(f"--hf-checkpoint {args.hf_checkpoint}: no config.json there; point it at a Hugging Face model directory")
    if not args.prompt_data:
        errors.append("--prompt-data is required: a jsonl file of prompts (tools/make_arith_data.py writes one)")
    elif not Path(args.prompt_data).is_file():
        errors.append(f"--prompt-data {args.prompt_data}: no such file")
    pairs = args.eval_prompt_data or []
    for name, path in zip(pairs[::2], pairs[1::2]):
        if not Path(path).is_file():
            errors.append(f"--eval-prompt-data {name} {path}: no such file")
    if args.load and not (Path(args.load) / "latest_checkpointed_iteration.txt").is_file():
        errors.append(f"--load {args.load}: no latest_checkpointed_iteration.txt there; pass a --save directory of an earlier run")
    adapter = args.lora.adapter_path if args.lora else None
    if adapter and not (Path(adapter) / CONFIG_NAME).is_file():
        errors.append(f"--lora-adapter-path {adapter}: no {CONFIG_NAME} there (a PEFT adapter directory)")
    if args.rollout_engine not in ENGINES:
        errors.append(f"--rollout-engine {args.rollout_engine}: unknown; choose one of {', '.join(sorted(ENGINES))}")
    if args.ref_load and not (Path(args.ref_load) / "config.json").is_file():
        errors.append(f"--ref-load {args.ref_load}: no config.json there")
    return errors


def _layout_errors(args: argparse.Namespace) -> list[str]:
    errors = []
    if args.hf_checkpoint and (Path(args.hf_checkpoint) / "config.json").is_file():
        from slime.backends.megatron_utils.arch import ModelArch

        errors += ModelArch.from_checkpoint(args.hf_checkpoint).tp_errors(args.tensor_model_parallel_size)
    cores = os.cpu_count() or 1
    if not torch.cuda.is_available() and not os.environ.get("RAY_ADDRESS") and args.world_size > cores:
        errors.append(f"--actor-num-gpus-per-node {args.actor_num_gpus_per_node} x --actor-num-nodes "
                      f"{args.actor_num_nodes} = {args.world_size} training processes, but this machine has {cores} "
                      f"CPU cores; lower them (or --tensor-model-parallel-size)")
    total = args.rollout_batch_size * args.n_samples_per_prompt
    if total % args.global_batch_size:
        errors.append(f"--global-batch-size {args.global_batch_size} must divide --rollout-batch-size x "
                      f"--n-samples-per-prompt ({total})")
    if args.global_batch_size % args.data_parallel_size:
        errors.append(f"--global-batch-size {args.global_batch_size} must be a multiple of the data-parallel size "
                      f"({args.data_parallel_size})")
    if args.pipeline_model_parallel_size > 1:
        errors.append("--pipeline-model-parallel-size > 1 is not supported by the RL trainer yet; use TP and DP")
    return errors


def check_run(args: argparse.Namespace) -> None:
    """Raise one UserError listing every problem; warn about legal but useless settings."""
    raise_collected(_path_errors(args) + _layout_errors(args))
    if args.advantage_estimator in ("grpo", "dr_grpo") and args.n_samples_per_prompt == 1:
        print(f"warning: --advantage-estimator {args.advantage_estimator} with --n-samples-per-prompt 1: every "
              "advantage is zero and nothing is learned; use 4 or more samples per prompt", file=sys.stderr)
