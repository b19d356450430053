"""Start-up checks that need files or the machine (the flag checks live in arguments.py).

Run in the driver before Ray starts, so a bad path, an impossible layout, a prompt file the
rollout would refuse (not UTF-8, empty, a bad row, a prompt longer than the model's context,
a label the built-in reward cannot score), a config.json or safetensors header the trainer
could not read, a LoRA rank above a module's dimension, a --lora-adapter-path or --load
directory the trainer would refuse (read and checked as it checks them, tensors aside), a
--custom-rm-path that does not import, or an output directory that cannot be written costs
nothing and leaves nothing behind.  Every problem is collected, then raised as one UserError;
the output directories this created are removed again when there is one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slime.ray.cluster import cluster_address
from slime.rollout.data import check_prompt_files
from slime.rollout.engines import ENGINES, vllm_max_loras_error, vllm_moe_lora_error
from slime.rollout.rm import label_problem, load_reward_fn
from slime.rollout.vllm_server import find_vllm_python, vllm_python_error
from slime.utils.errors import UserError, raise_collected
from slime.utils.lora_config import rank_errors, target_matches
from slime.utils.peft_format import CONFIG_NAME
from slime.utils.tasks import FLAG, task_args

if TYPE_CHECKING:  # imported when a config.json is there to read
    from slime.backends.megatron_utils.arch import ModelArch


def _data_path_errors(args: argparse.Namespace) -> list[str]:
    """The prompt file and the eval files: given, and there."""
    errors = []
    if not args.prompt_data:
        errors.append("--prompt-data is required: a jsonl file of prompts (tools/make_arith_data.py writes one)")
    elif not Path(args.prompt_data).is_file():
        errors.append(f"--prompt-data {args.prompt_data}: no such file")
    pairs = args.eval_prompt_data or []
    for name, path in zip(pairs[::2], pairs[1::2]):
        if not Path(path).is_file():
            errors.append(f"--eval-prompt-data {name} {path}: no such file")
    return errors


def _path_errors(args: argparse.Namespace) -> list[str]:
    errors = []
    if args.hf_checkpoint is None:
        errors.append("--hf-checkpoint is required: a Hugging Face model directory (tools/prepare_model.py makes one)")
    elif not (Path(args.hf_checkpoint) / "config.json").is_file():
        errors.append(f"--hf-checkpoint {args.hf_checkpoint}: no config.json there; point it at a Hugging Face model directory")
    if not args.tasks:  # with --lora-tasks every task's files are checked by _task_problems
        errors += _data_path_errors(args)
    if args.load and not (Path(args.load) / "latest_checkpointed_iteration.txt").is_file():
        errors.append(f"--load {args.load}: no latest_checkpointed_iteration.txt there; pass a --save directory of an earlier run")
    adapter = args.lora.adapter_path if args.lora else None
    if adapter and not (Path(adapter) / CONFIG_NAME).is_file():
        errors.append(f"--lora-adapter-path {adapter}: no {CONFIG_NAME} there (a PEFT adapter directory)")
    if args.rollout_engine not in ENGINES:
        errors.append(f"--rollout-engine {args.rollout_engine}: unknown; choose one of {', '.join(sorted(ENGINES))}")
    elif args.rollout_engine == "vllm" and (problem := vllm_python_error(find_vllm_python(args.vllm_python))):
        errors.append(problem)
    if problem := vllm_max_loras_error(args):
        errors.append(problem)
    if args.ref_load and not (Path(args.ref_load) / "config.json").is_file():
        errors.append(f"--ref-load {args.ref_load}: no config.json there")
    return errors


def _model_arch(args: argparse.Namespace) -> tuple[ModelArch | None, list[str]]:
    """The model's shape from --hf-checkpoint's config.json (None when there is none to read)."""
    if not args.hf_checkpoint or not (Path(args.hf_checkpoint) / "config.json").is_file():
        return None, []  # reported by _path_errors
    from slime.backends.megatron_utils.arch import ModelArch

    path = Path(args.hf_checkpoint) / "config.json"
    try:
        arch = ModelArch.from_checkpoint(args.hf_checkpoint)
    except UserError as exc:
        return None, [str(exc)]
    except KeyError as exc:  # a field the model needs is absent
        return None, [f"{path}: no {exc.args[0]!r} field; point --hf-checkpoint at a complete Hugging Face model "
                      "directory"]
    except (TypeError, AttributeError, ValueError, ArithmeticError) as exc:  # not an object, a field of the wrong type
        return None, [f"{path}: not a model config this trainer can read ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())}); point --hf-checkpoint at a Hugging Face model directory"]
    hf_keys = {"num_layers": "num_hidden_layers", "ffn_hidden_size": "intermediate_size",
               "num_query_groups": "num_key_value_heads"}
    for field, value in vars(arch).items():  # the sizes the model is built from: positive integers
        if field in _ARCH_SIZES and (type(value) is not int or value < 1):
            return None, [f"{path}: {hf_keys.get(field, field)} is {value!r}, expected an integer >= 1"]
    return arch, []


_ARCH_SIZES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
               "vocab_size", "max_position_embeddings")


def _layout_errors(args: argparse.Namespace, arch: ModelArch | None) -> list[str]:
    errors = arch.tp_errors(args.tensor_model_parallel_size) if arch else []
    if arch:
        from slime.backends.megatron_utils.arch import default_dispatcher

        errors += arch.moe_errors(tp_size=args.tensor_model_parallel_size, ep_size=args.expert_model_parallel_size,
                                  etp_size=args.expert_tensor_parallel_size, sequence_parallel=args.sequence_parallel,
                                  dispatcher=args.moe_token_dispatcher_type or default_dispatcher(),
                                  on_gpu=torch.cuda.is_available())
    cores = os.cpu_count() or 1
    if not torch.cuda.is_available() and not cluster_address(args.ray_address) and args.world_size > cores:
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
    pp = args.pipeline_model_parallel_size
    if arch and pp > 1 and arch.num_layers % pp:
        errors.append(f"--pipeline-model-parallel-size {pp} does not divide the model's {arch.num_layers} layers")
    if arch and pp > 1 and arch.tie_word_embeddings and (not torch.cuda.is_available() or not args.use_lora):
        # megatron syncs the two copies of a tied embedding at start-up with a CUDA-only call, and
        # their gradients in its own DDP, which full fine-tuning here does not use
        errors.append(f"--pipeline-model-parallel-size {pp}: the model ties its embeddings (tie_word_embeddings), "
                      "which the pipeline supports only with --use-lora on GPUs; use TP and DP")
    return errors


def _lora_errors(args: argparse.Namespace, arch: ModelArch | None) -> list[str]:
    """--lora-r against the target modules' shapes, computed from config.json as the trainer builds them."""
    if args.lora is None or arch is None:
        return []
    targets = args.lora.targets
    shapes = {name: shape for name, shape in arch.linear_shapes().items()
              if any(target_matches(target, name) for target in targets)}
    errors = rank_errors(args.lora.r, shapes)
    if args.rollout_engine == "vllm" and arch.is_moe:
        errors += _vllm_moe_errors(set(shapes), arch, on_gpu=torch.cuda.is_available())
    for task in args.tasks:  # each task's own r (the targets are the run's)
        if task.lora.r != args.lora.r:
            errors += [f"{FLAG} {args.lora_tasks}, task '{task.name}': {e}" for e in rank_errors(task.lora.r, shapes)]
    return errors


def _vllm_moe_errors(targeted: set[str], arch: ModelArch, *, on_gpu: bool) -> list[str]:
    """vLLM serves LoRA on an MoE model only on GPUs, and only with gate, up and down of every expert
    of an adapted layer (anything less fails inside vLLM with a bare assertion)."""
    if problem := vllm_moe_lora_error(arch.is_moe, on_gpu):
        return [problem]
    experts = {name for name in arch.linear_shapes() if ".local_experts." in name}
    layers = {name.split(".mlp.")[0] for name in targeted & experts}
    partial = sorted(layer for layer in layers if {n for n in experts if n.startswith(layer + ".")} - targeted)
    if partial:
        return [f"--lora-target-modules: vLLM needs LoRA on gate, up and down of every expert of an adapted layer "
                f"({partial[0]} has only some); target both linear_fc1 and linear_fc2, or neither"]
    return []


def _weights_errors(args: argparse.Namespace, arch: ModelArch | None) -> list[str]:
    """--hf-checkpoint's safetensors: present, and headers that cover the files (truncation); no tensor is read."""
    if arch is None:
        return []
    from slime.backends.megatron_utils.hf_checkpoint import CheckpointReader

    try:
        CheckpointReader(args.hf_checkpoint, arch)
    except UserError as exc:
        return [str(exc)]
    return []


def _adapter_errors(args: argparse.Namespace, arch: ModelArch | None) -> list[str]:
    """--lora-adapter-path read and checked as the trainer's loader checks it: a valid PEFT directory,
    made for this base model (module shapes), with the r / alpha / rslora of the flags."""
    adapter_path = args.lora.adapter_path if args.lora else None
    if arch is None or not adapter_path or not (Path(adapter_path) / CONFIG_NAME).is_file():
        return []  # no adapter, or reported by _path_errors
    from slime.utils.peft_format import read_peft_adapter
    from slime_plugins.lora.peft_io import check_flags, shape_errors  # the loader's own checks, same messages

    try:
        adapter = read_peft_adapter(adapter_path)
        errors = shape_errors(adapter, arch)
        if not errors:
            check_flags(adapter, args.lora)
    except UserError as exc:
        return [str(exc)]
    return [errors[0] if len(errors) == 1 else f"{errors[0]} (and {len(errors) - 1} more)"] if errors else []


def _load_errors(args: argparse.Namespace, arch: ModelArch | None) -> list[str]:
    """--load: the latest-iteration file, the checkpoint it names and its fit with this run (as the trainer checks)."""
    if arch is None or not args.load or not (Path(args.load) / "latest_checkpointed_iteration.txt").is_file():
        return []  # reported by _path_errors
    from slime.backends.megatron_utils.checkpoint import load_dir_problem

    problem = load_dir_problem(args.load, arch, args, world_size=args.world_size)
    return [problem] if problem else []


def _reward_errors(args: argparse.Namespace) -> list[str]:
    """The reward function the flags name (a --custom-rm-path module is imported now, in this process, as the
    rollout manager would)."""
    try:
        load_reward_fn(args)
    except UserError as exc:
        return [str(exc)]
    return []


def _load_tokenizer(checkpoint: str) -> tuple[Any, list[str]]:
    """The rollout's tokenizer (RolloutManager loads the same one), or why it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(checkpoint), []
    except (OSError, ValueError, TypeError):
        return None, [f"--hf-checkpoint {checkpoint}: no tokenizer could be loaded there (the rollout tokenises the "
                      "prompts with it); copy the model's tokenizer files next to its config.json"]
    except Exception as exc:  # transformers' own checks of config.json / tokenizer files, each its own type
        reason = " ".join(str(exc).split())[:300]
        return None, [f"--hf-checkpoint {checkpoint}: transformers cannot load its tokenizer ({type(exc).__name__}: "
                      f"{reason}); fix the files there (config.json, tokenizer files)"]


def _data_problems(args: argparse.Namespace, arch: ModelArch | None,
                   tokenizer: Any = None) -> tuple[list[str], list[str]]:
    """Every prompt file built as the rollout builds it: (errors, what --over-long-prompts left out or cut);
    ``tokenizer``: the rollout's, when already loaded."""
    if arch is None or not args.prompt_data:
        return [], []
    errors = []
    if tokenizer is None:
        tokenizer, errors = _load_tokenizer(args.hf_checkpoint)
    if tokenizer is None:
        return errors, []
    return check_prompt_files(args, tokenizer, arch.max_position_embeddings, check_label=label_problem(args))


def _task_problems(args: argparse.Namespace, arch: ModelArch | None) -> tuple[list[str], list[str]]:
    """The reward and the prompt files (errors, warnings) of the run, or of every ``--lora-tasks`` task, each
    checked as its one-task run would be (:func:`task_args`) and prefixed with the file and the task."""
    if not args.tasks:
        data_errors, warnings = _data_problems(args, arch)
        return _reward_errors(args) + data_errors, warnings
    tokenizer, errors = (None, [])
    if arch is not None:
        tokenizer, errors = _load_tokenizer(args.hf_checkpoint)  # once, not once per task
    warnings: list[str] = []
    for task in args.tasks:
        view, prefix = task_args(args, task), f"{FLAG} {args.lora_tasks}, task '{task.name}': "
        task_errors = _data_path_errors(view) + _reward_errors(view)
        data_errors, data_warnings = _data_problems(view, arch, tokenizer) if tokenizer is not None else ([], [])
        errors += [prefix + e for e in task_errors + data_errors]
        warnings += [prefix + w for w in data_warnings]
    return errors, warnings


def _make_dirs(flag: str, target: Path, created: list[Path]) -> str | None:
    """Create ``target`` and its missing parents, recording each in ``created``; or say why not."""
    missing, existing = [], target
    while not existing.exists() and not existing.is_symlink():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        return f"{flag} {target}: {existing} is not a directory; pass a path under a directory"
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except OSError as exc:
            return (f"{flag} {target}: cannot create {directory} ({exc.strerror}); pass a writable path or fix the "
                    f"permissions of {directory.parent}")
        created.append(directory)
    return None


def output_dir_errors(dirs: list[tuple[str, str]]) -> tuple[list[str], list[Path]]:
    """Each ``(flag, path)`` the run will write into: created if missing, then a probe file is
    created and removed in it.  Returns the problems and the directories created (parents first)."""
    errors: list[str] = []
    created: list[Path] = []
    for flag, path in dirs:
        target = Path(path)
        if target.exists() and not target.is_dir():
            errors.append(f"{flag} {target}: a file, not a directory; pass a directory (or move the file away)")
            continue
        problem = _make_dirs(flag, target, created)
        if problem is None:
            probe = target / f".slime-write-probe-{os.getpid()}"
            try:
                os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                probe.unlink()
            except OSError as exc:
                problem = (f"{flag} {target}: cannot write there ({exc.strerror}); pass a writable directory or fix "
                           "its permissions")
        if problem:
            errors.append(problem)
    return errors, created


def _remove_dirs(created: list[Path]) -> None:
    for directory in reversed(created):  # children first; only what is still empty
        try:
            directory.rmdir()
        except OSError:
            pass


def check_run(args: argparse.Namespace) -> None:
    """Raise one UserError listing every problem; warn about legal but useless settings."""
    arch, errors = _model_arch(args)
    errors = _path_errors(args) + errors + _layout_errors(args, arch) + _lora_errors(args, arch)
    errors += _weights_errors(args, arch) + _adapter_errors(args, arch) + _load_errors(args, arch)
    data_errors, warnings = _task_problems(args, arch)
    errors += data_errors
    outputs = [(flag, path) for flag, path in (("--save", args.save), ("--log-dir", args.log_dir)) if path]
    output_errors, created = output_dir_errors(outputs)
    errors += output_errors
    if errors:
        _remove_dirs(created)
        raise_collected(errors)
    for flag, path in outputs:
        if Path(path) in created:
            print(f"created the {flag} directory {path}", flush=True)
    for warning in warnings:
        print(warning, file=sys.stderr, flush=True)
    if args.advantage_estimator in ("grpo", "dr_grpo") and args.n_samples_per_prompt == 1:
        print(f"warning: --advantage-estimator {args.advantage_estimator} with --n-samples-per-prompt 1: every "
              "advantage is zero and nothing is learned; use 4 or more samples per prompt", file=sys.stderr)
