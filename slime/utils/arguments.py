"""Command-line flags of ``train.py``, grouped as in slime, validated at start-up.

Every problem found by :func:`validate_args` is collected first and then raised as one
:class:`~slime.utils.errors.UserError`, so a user fixes all of them in one go.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys

from slime.utils import allocator
from slime.utils.errors import EXIT_USER_ERROR, UserError
from slime.utils.lora_config import ALL_LINEAR, LoraConfig
from slime.utils.tasks import load_tasks, read_tasks


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag ends in one line (not a usage dump) and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)


def add_cluster_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("cluster")
    g.add_argument("--ray-address", type=str, default=None, metavar="ADDR",
                   help="join this running Ray cluster (e.g. HEAD_IP:6379, as `ray start --head` prints) instead of "
                        "starting a private one; default $RAY_ADDRESS, which this flag overrides")
    g.add_argument("--actor-num-nodes", type=int, default=1)
    g.add_argument("--actor-num-gpus-per-node", type=int, default=None,
                   help="training processes per node (on a machine without GPUs: CPU processes); default TP x PP")
    g.add_argument("--colocate", action="store_true", help="rollout and training share the same bundles")
    g.add_argument("--actor-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="end the run (with the resume command) when one call of the rollout engine or the trainers "
                        "has not returned after this long (0: no limit)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="MoE models: experts split over this many ranks (within the data-parallel ranks)")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=1,
                   help="MoE models: TP inside an expert; LoRA on experts needs 1 (whole experts per rank)")
    g.add_argument("--moe-token-dispatcher-type", choices=("allgather", "alltoall"), default=None,
                   help="how tokens reach their experts' ranks; default alltoall on GPUs, allgather on CPUs (gloo)")
    g.add_argument("--allocator", choices=allocator.CHOICES, default="auto",
                   help="malloc of the training and rollout processes: tcmalloc (bounded memory, warm pages; "
                        "installed by make setup), system (glibc), auto = tcmalloc when present")
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model and checkpoints")
    g.add_argument("--hf-checkpoint", type=str, default=None, help="Hugging Face model directory (config, safetensors, tokenizer)")
    g.add_argument("--load", type=str, default=None, help="resume from this --save directory")
    g.add_argument("--save", type=str, default=None, help="write checkpoints (adapter-only with --use-lora) here")
    g.add_argument("--save-interval", type=int, default=None, help="save every N rollouts (and at the end)")
    g.add_argument("--ref-load", type=str, default=None, help="reference model for KL without LoRA (HF directory)")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute (fp32 by default)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--recompute-activations", action="store_true", help="recompute each layer in backward")
    return parser


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("optimisation")
    g.add_argument("--global-batch-size", type=int, default=None, help="samples per optimizer step (default: one step per rollout)")
    g.add_argument("--micro-batch-size", type=int, default=1, help="samples per forward/backward")
    g.add_argument("--max-tokens-per-micro-batch", type=int, default=None,
                   help="pack variable-length samples into micro-batches of at most this many tokens")
    g.add_argument("--lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=["constant", "cosine", "linear"], default="constant")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.98)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    return parser


def add_algorithm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("RL algorithm")
    g.add_argument("--advantage-estimator", choices=["grpo", "dr_grpo", "reinforce"], default="grpo",
                   help="grpo: (r - mean) / std per group; dr_grpo: r - mean; reinforce: raw reward")
    g.add_argument("--n-samples-per-prompt", type=int, default=1)
    g.add_argument("--eps-clip", type=float, default=0.2)
    g.add_argument("--eps-clip-high", type=float, default=None)
    g.add_argument("--use-kl-loss", action="store_true")
    g.add_argument("--kl-loss-coef", type=float, default=0.0)
    g.add_argument("--kl-loss-type", choices=["k1", "k2", "k3", "low_var_kl"], default="low_var_kl")
    g.add_argument("--entropy-coef", type=float, default=0.0)
    g.add_argument("--check-logprob-gap", type=float, default=None,
                   help="fail when mean |logp_rollout - logp_train| exceeds this (default 1e-3 fp32, 5e-2 bf16; 0 disables)")
    return parser


def add_rollout_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("rollout and data")
    g.add_argument("--rollout-engine", type=str, default="hf",
                   help="the rollout engine, a name of slime/rollout/engines.py (hf: built-in transformers + peft)")
    g.add_argument("--prompt-data", type=str, default=None, help="jsonl (or parquet) of prompts")
    g.add_argument("--input-key", type=str, default="prompt")
    g.add_argument("--label-key", type=str, default="label")
    g.add_argument("--metadata-key", type=str, default="metadata")
    g.add_argument("--apply-chat-template", action="store_true")
    g.add_argument("--over-long-prompts", choices=["error", "drop", "truncate"], default="error",
                   help="a prompt (as rendered and tokenised for the rollout) longer than max_position_embeddings - "
                        "--rollout-max-response-len (--eval-max-response-len for eval sets): error = fail at start-up "
                        "naming it; drop = leave it out; truncate = keep its last tokens (the question and the chat "
                        "template's assistant header are at the end; the start, e.g. a system prompt, is lost)")
    g.add_argument("--rollout-batch-size", type=int, default=8, help="prompts per rollout")
    g.add_argument("--rollout-max-response-len", type=int, default=256)
    g.add_argument("--rollout-temperature", type=float, default=1.0)
    g.add_argument("--rollout-top-p", type=float, default=1.0)
    g.add_argument("--rollout-top-k", type=int, default=-1)
    g.add_argument("--num-rollout", type=int, default=None)
    g.add_argument("--num-epoch", type=int, default=None)
    g.add_argument("--rollout-num-threads", type=int, default=None, help="torch threads of the built-in engine")
    g.add_argument("--rollout-merge-lora", action=argparse.BooleanOptionalAction, default=True,
                   help="built-in engine: fold the adapter into the base weights while generating (faster)")
    g.add_argument("--async-rollout", action="store_true",
                   help="generate rollout N+1 while the trainer steps on rollout N (off-policy by up to "
                        "--max-staleness versions; the importance ratio uses the version that sampled)")
    g.add_argument("--max-staleness", type=int, default=1,
                   help="with --async-rollout: how many trainer versions a rollout may trail (rollouts started ahead)")
    g.add_argument("--rollout-num-engines", type=int, default=1,
                   help="rollout engine processes (each its own Ray actor); a rollout's groups are split among them")
    g.add_argument("--rm-type", type=str, default="math", help="math or exact")
    g.add_argument("--custom-rm-path", type=str, default=None, help="module.path:function or file.py:function")
    g.add_argument("--reward-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="end the run when one reward call has not returned after this long (0: no limit; the "
                        "function then runs in the driver's main thread, e.g. for signal.alarm)")
    g.add_argument("--eval-prompt-data", type=str, nargs="+", default=None, metavar="NAME PATH")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--n-samples-per-eval-prompt", type=int, default=1)
    g.add_argument("--eval-temperature", type=float, default=0.0)
    g.add_argument("--eval-max-response-len", type=int, default=None)
    return parser


def add_logging_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("logging")
    g.add_argument("--log-dir", type=str, default=None, help="metrics.jsonl and curves.png go here")
    g.add_argument("--use-wandb", action="store_true")
    g.add_argument("--wandb-project", type=str, default="slime-lora")
    g.add_argument("--use-tensorboard", action="store_true")
    return parser


def add_vllm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("vLLM rollout engine (--rollout-engine vllm)")
    g.add_argument("--vllm-python", type=str, default=None, metavar="PATH",
                   help="python of an environment with vLLM (default: $SLIME_VLLM_PYTHON, else .venv-vllm/bin/python, "
                        "made by `make setup-vllm`)")
    g.add_argument("--vllm-start-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="end the run when a vLLM server has not answered /health after this long")
    g.add_argument("--vllm-max-loras", type=int, default=None,
                   help="adapters one vLLM batch may hold (default 2 per adapter, 2 x tasks with --lora-tasks: a new "
                        "adapter version loads before the old one unloads)")
    g.add_argument("--vllm-max-model-len", type=int, default=None, help="vLLM's --max-model-len (default: the model's)")
    g.add_argument("--vllm-kv-cache-gib", type=int, default=None,
                   help="CPU backend: KV-cache GiB (VLLM_CPU_KVCACHE_SPACE; default 1/16 of memory, 1..32)")
    g.add_argument("--vllm-extra-args", type=str, default=None, metavar="'ARGS'",
                   help="more flags for vLLM's server, one shell-quoted string (e.g. '--tensor-parallel-size 2')")
    return parser


def add_lora_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The LoRA flags; ``--lora-r`` becomes ``adapter_config.json["r"]``, and so on."""
    g = parser.add_argument_group("LoRA")
    g.add_argument("--use-lora", action="store_true", help="train low-rank adapters instead of the full model")
    g.add_argument("--lora-r", type=int, default=8, help="rank r of the adapters")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="scaling is alpha / r")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input")
    g.add_argument("--lora-target-modules", type=str, nargs="+", default=list(ALL_LINEAR),
                   help="Megatron module names (linear_qkv linear_proj linear_fc1 linear_fc2), their HF aliases "
                        "(q_proj ... down_proj), 'all-linear', or globs over dotted names")
    g.add_argument("--lora-only-trainable", action=argparse.BooleanOptionalAction, default=True,
                   help="freeze every non-LoRA parameter (default); --no-lora-only-trainable trains the base too")
    g.add_argument("--lora-use-rslora", action="store_true", help="scaling alpha / sqrt(r) (rank-stabilised LoRA)")
    g.add_argument("--lora-verbose", action="store_true", help="log every wrapped module, not only the first layer's")
    g.add_argument("--lora-adapter-path", type=str, default=None, help="start from this PEFT adapter directory")
    g.add_argument("--lora-tasks", type=str, default=None, metavar="FILE",
                   help="train one adapter per task on one base, in one run: a YAML or JSON list of tasks (name, "
                        "prompt_data, rm_type or custom_rm_path, optional eval_prompt_data, lr, r, lora_alpha); "
                        "see docs/multitask.md")
    g.add_argument("--lora-recompute-input", action="store_true",
                   help="keep no adapter input for backward: recompute it from the norm/SwiGLU that made it "
                        "(less activation memory, one elementwise pass more per layer)")
    return parser


def add_slime_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for add in (add_cluster_arguments, add_model_arguments, add_training_arguments, add_algorithm_arguments,
                add_rollout_arguments, add_vllm_arguments, add_logging_arguments):
        parser = add(parser)
    parser = add_lora_arguments(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_slime_arguments(_Parser(prog="train.py", description="RL post-training with optional LoRA"))


def validate_lora_args(args: argparse.Namespace) -> list[str]:
    config = LoraConfig.from_args(args)
    return config.errors() if config is not None else []


def vllm_errors(args: argparse.Namespace) -> list[str]:
    """What ``--rollout-engine vllm`` cannot do with these flags (whether vLLM is installed: preflight)."""
    if args.rollout_engine != "vllm":
        return []
    errors = []
    if not args.use_lora:
        errors.append("--rollout-engine vllm syncs LoRA adapters only (vLLM has no stable API to reload base weights "
                      "in place): add --use-lora, or use --rollout-engine hf for full-parameter RL")
    if args.rollout_top_p < 1 or args.rollout_top_k > 0:
        errors.append("--rollout-engine vllm reports log-probs after top-p/top-k truncation, which the trainer does not "
                      "reproduce: use --rollout-top-p 1 --rollout-top-k -1, or --rollout-engine hf")
    if not args.vllm_start_timeout > 0:
        errors.append(f"--vllm-start-timeout must be > 0 seconds (got {args.vllm_start_timeout})")
    if args.vllm_kv_cache_gib is not None and args.vllm_kv_cache_gib < 1:
        errors.append(f"--vllm-kv-cache-gib must be >= 1 (got {args.vllm_kv_cache_gib})")
    if args.vllm_max_model_len is not None and args.vllm_max_model_len <= args.rollout_max_response_len:
        errors.append(f"--vllm-max-model-len {args.vllm_max_model_len} leaves no room for a prompt before "
                      f"--rollout-max-response-len {args.rollout_max_response_len}")
    try:
        shlex.split(args.vllm_extra_args or "")
    except ValueError as exc:
        errors.append(f"--vllm-extra-args: not a shell-quoted string ({exc})")
    return errors


def _flag(name: str) -> str:
    """``rollout_num_threads`` -> ``--rollout-num-threads``."""
    return "--" + name.replace("_", "-")


# Counts and sizes: always given, or None until given (then filled by finalize_args or unused).
AT_LEAST_ONE = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                "expert_tensor_parallel_size", "actor_num_nodes", "micro_batch_size",
                "rollout_batch_size", "rollout_max_response_len", "n_samples_per_prompt", "n_samples_per_eval_prompt",
                "rollout_num_engines", "vllm_max_loras", "num_rollout", "num_epoch", "save_interval", "eval_interval",
                "actor_num_gpus_per_node", "global_batch_size", "max_tokens_per_micro_batch", "eval_max_response_len",
                "rollout_num_threads", "lr_decay_iters", "max_staleness")


def _non_negative_errors(args: argparse.Namespace, notes: dict[str, str]) -> list[str]:
    """Each flag of ``notes`` that is given must be a finite number >= 0 (``notes``: what 0 means, or "")."""
    errors = []
    for name, note in notes.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            errors.append(f"{_flag(name)} must be a finite number >= 0 (got {value}{'; ' + note if note else ''})")
    return errors


def _count_errors(args: argparse.Namespace) -> list[str]:
    """Counts and sizes >= 1, the run length, the seed."""
    errors = []
    for name in AT_LEAST_ONE:
        value = getattr(args, name)
        if value is not None and value < 1:
            errors.append(f"{_flag(name)} must be >= 1 (got {value})")
    if args.num_rollout is not None and args.num_epoch is not None:
        errors.append("--num-rollout and --num-epoch are exclusive; give one")
    if not 0 <= args.seed < 2**32:
        errors.append(f"--seed must be in [0, 2**32) (got {args.seed})")
    return errors


def _optimizer_errors(args: argparse.Namespace) -> list[str]:
    """--lr and its schedule, AdamW's hyper-parameters, gradient clipping."""
    errors = []
    lr_ok = args.lr > 0 and math.isfinite(args.lr)
    if not lr_ok:
        errors.append(f"--lr must be a positive number (got {args.lr})")
    if not (math.isfinite(args.min_lr) and args.min_lr >= 0 and (not lr_ok or args.min_lr <= args.lr)):
        errors.append(f"--min-lr must be a finite number in [0, --lr {args.lr}] (got {args.min_lr})")
    if args.lr_warmup_iters < 0:
        errors.append(f"--lr-warmup-iters must be >= 0 (got {args.lr_warmup_iters}; 0: no warm-up)")
    if args.lr_decay_style != "constant" and args.lr_decay_iters is None:
        errors.append(f"--lr-decay-style {args.lr_decay_style} needs --lr-decay-iters N (the steps to decay "
                      "--lr to --min-lr over); give it, or use --lr-decay-style constant")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(args, name)
        if not 0 <= value < 1:  # also refuses nan
            errors.append(f"{_flag(name)} must be in [0, 1) (got {value})")
    return errors + _non_negative_errors(args, {"adam_eps": "", "weight_decay": "", "clip_grad": "0 disables clipping"})


def _algorithm_errors(args: argparse.Namespace) -> list[str]:
    """The loss: the PPO clip range, the KL and entropy coefficients, the log-prob gap check."""
    notes = {"eps_clip": "", "eps_clip_high": "", "check_logprob_gap": "0 disables the check"}
    errors = _non_negative_errors(args, {**notes, **({"kl_loss_coef": ""} if args.use_kl_loss else {})})
    if not math.isfinite(args.entropy_coef):
        errors.append(f"--entropy-coef must be a finite number (got {args.entropy_coef})")
    return errors


def _rollout_errors(args: argparse.Namespace) -> list[str]:
    """Sampling, evaluation sets, rewards, time limits."""
    errors = []
    if not (args.rollout_temperature > 0 and math.isfinite(args.rollout_temperature)):
        errors.append(f"--rollout-temperature must be a finite number > 0 for sampling (got {args.rollout_temperature})"
                      "; use --eval-temperature 0 for greedy evaluation")
    if not 0 < args.rollout_top_p <= 1:
        errors.append(f"--rollout-top-p must be in (0, 1] (got {args.rollout_top_p})")
    if args.eval_prompt_data is not None and len(args.eval_prompt_data) % 2:
        errors.append("--eval-prompt-data takes NAME PATH pairs, e.g. --eval-prompt-data arith eval.jsonl")
    if args.custom_rm_path is None and args.rm_type not in ("math", "exact"):
        errors.append(f"--rm-type '{args.rm_type}' is unknown; use math or exact, or give --custom-rm-path")
    return errors + _non_negative_errors(args, {"eval_temperature": "0: greedy", "reward_timeout": "0: no limit",
                                                "actor_timeout": "0: no limit"})


def _dependency_errors(args: argparse.Namespace) -> list[str]:
    """Flags that do nothing without another one."""
    errors = []
    if args.lora_adapter_path and not args.use_lora:
        errors.append(f"--lora-adapter-path {args.lora_adapter_path} needs --use-lora (without it the adapter is "
                      "ignored); add --use-lora")
    if args.use_tensorboard and not args.log_dir:
        errors.append("--use-tensorboard needs --log-dir (the event files go under it); add --log-dir DIR")
    if args.save_interval is not None and not args.save:
        errors.append(f"--save-interval {args.save_interval} needs --save (without it nothing is saved); "
                      "add --save DIR")
    if args.async_rollout and not (args.use_lora and args.lora_only_trainable):
        errors.append("--async-rollout needs --use-lora with --lora-only-trainable (the trainer keeps the sampling "
                      "versions' adapters, not copies of the whole model); add --use-lora")
    return errors


def _cluster_errors(args: argparse.Namespace) -> list[str]:
    """The process layout and the allocator."""
    errors = []
    dp_world = (args.actor_num_gpus_per_node or 0) * args.actor_num_nodes
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if args.actor_num_gpus_per_node is not None and dp_world % model_parallel:
        errors.append(f"--actor-num-nodes x --actor-num-gpus-per-node ({dp_world}) must be a multiple of TP x PP "
                      f"({model_parallel})")
    expert_parallel = args.expert_model_parallel_size * args.expert_tensor_parallel_size * args.pipeline_model_parallel_size
    world = dp_world or model_parallel
    if args.expert_model_parallel_size > 1 and world % expert_parallel:
        errors.append(f"--expert-model-parallel-size {args.expert_model_parallel_size} x --expert-tensor-parallel-size "
                      f"{args.expert_tensor_parallel_size} x PP must divide the training processes ({world}); "
                      "raise --actor-num-gpus-per-node or lower --expert-model-parallel-size")
    if args.allocator == "tcmalloc" and allocator.find_tcmalloc() is None:
        errors.append(f"--allocator tcmalloc: {allocator.LIBRARY} not found; run `make setup` (or apt-get install "
                      "libtcmalloc-minimal4), or use --allocator auto")
    return errors


def validate_args(args: argparse.Namespace) -> list[str]:
    """Every problem with the flags (and the --lora-tasks file), each one line naming the flag and the fix."""
    return [*_count_errors(args), *_optimizer_errors(args), *_algorithm_errors(args), *_rollout_errors(args),
            *_dependency_errors(args), *vllm_errors(args), *_cluster_errors(args), *validate_lora_args(args),
            *read_tasks(args)[1]]


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults that depend on other flags."""
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if args.actor_num_gpus_per_node is None:
        args.actor_num_gpus_per_node = -(-model_parallel // args.actor_num_nodes)
    args.world_size = args.actor_num_nodes * args.actor_num_gpus_per_node
    args.data_parallel_size = args.world_size // model_parallel
    if args.global_batch_size is None:
        args.global_batch_size = args.rollout_batch_size * args.n_samples_per_prompt
    if args.eval_max_response_len is None:
        args.eval_max_response_len = args.rollout_max_response_len
    if args.eps_clip_high is None:
        args.eps_clip_high = args.eps_clip
    if args.check_logprob_gap is None:
        args.check_logprob_gap = 5e-2 if args.bf16 else 1e-3
    if args.num_rollout is None and args.num_epoch is None:
        args.num_rollout = 1
    args.lora = LoraConfig.from_args(args)  # what the trainer, PEFT I/O and checkpoints read
    args.tasks = load_tasks(args)  # [] without --lora-tasks
    if args.vllm_max_loras is None:
        args.vllm_max_loras = 2 * max(1, len(args.tasks))
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, validate (all errors at once, as one UserError) and finalise the flags."""
    args = build_parser().parse_args(argv)
    errors = validate_args(args)
    if errors:
        raise UserError("; ".join(errors))
    return finalize_args(args)
