"""train.py flags: parser defaults, errors collected at once, LoRA flag checks, one-line argparse errors.

Already covered elsewhere (not repeated here): --allocator (tests/utils/test_allocator.py),
--lora-recompute-input with --lora-dropout through parse_args (tests/slime_plugins/lora/
test_input_recompute.py), the --use-wandb / --use-tensorboard checks (tests/utils/test_metrics.py).
Messages are matched on the flag names they mention, not on whole sentences.
"""

import re

import pytest

from slime.utils.arguments import build_parser, parse_args, validate_args
from slime.utils.errors import EXIT_USER_ERROR, UserError


def _errors(*argv):
    return validate_args(build_parser().parse_args([str(a) for a in argv]))


def _names(message, flag):
    """``flag`` appears in ``message`` as a whole flag (``--lora-r`` is not in ``--lora-recompute-input``)."""
    return re.search(re.escape(flag) + r"(?![\w-])", message) is not None


def _one_naming(errors, *flags):
    """The single message among ``errors`` that names every flag in ``flags``."""
    hits = [e for e in errors if all(_names(e, f) for f in flags)]
    assert len(hits) == 1, (flags, errors)
    return hits[0]


# --------------------------------------------------------------------------- defaults


def test_parser_defaults():
    args = build_parser().parse_args([])
    assert args.lr == 1e-6 and args.min_lr == 0.0 and args.lr_decay_style == "constant"
    assert args.lr_warmup_iters == 0 and args.lr_decay_iters is None
    assert (args.adam_beta1, args.adam_beta2, args.adam_eps) == (0.9, 0.98, 1e-8)
    assert args.clip_grad == 1.0 and args.weight_decay == 0.0
    assert args.advantage_estimator == "grpo" and args.n_samples_per_prompt == 1
    assert args.eps_clip == 0.2 and args.eps_clip_high is None
    assert args.use_kl_loss is False and args.kl_loss_coef == 0.0 and args.kl_loss_type == "low_var_kl"
    assert args.micro_batch_size == 1 and args.global_batch_size is None
    assert args.rollout_batch_size == 8 and args.rollout_max_response_len == 256 and args.rollout_temperature == 1.0
    assert args.tensor_model_parallel_size == 1 and args.pipeline_model_parallel_size == 1
    assert args.num_rollout is None and args.num_epoch is None and args.seed == 1234
    assert args.rollout_merge_lora is True and args.bf16 is False
    assert args.reward_timeout == 60.0 and args.actor_timeout == 3600.0


def test_lora_defaults():
    args = build_parser().parse_args([])
    assert args.use_lora is False
    assert args.lora_r == 8 and args.lora_alpha == 16.0 and args.lora_dropout == 0.0
    assert args.lora_target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    assert args.lora_only_trainable is True and args.lora_use_rslora is False
    assert args.lora_recompute_input is False and args.lora_adapter_path is None


def test_boolean_optional_flags_have_negations():
    args = build_parser().parse_args(["--no-lora-only-trainable", "--no-rollout-merge-lora"])
    assert args.lora_only_trainable is False and args.rollout_merge_lora is False


def test_parse_args_fills_dependent_defaults():
    args = parse_args(["--rollout-batch-size", "4", "--n-samples-per-prompt", "3", "--eps-clip", "0.1"])
    assert args.global_batch_size == 12  # one optimizer step per rollout: 4 prompts x 3 samples
    assert args.eps_clip_high == 0.1  # symmetric clipping unless --eps-clip-high is given
    assert args.num_rollout == 1
    assert args.eval_max_response_len == 256
    assert args.check_logprob_gap == 1e-3
    assert parse_args(["--bf16"]).check_logprob_gap == 5e-2
    assert parse_args(["--eps-clip-high", "0.28"]).eps_clip_high == 0.28
    args = parse_args(["--tensor-model-parallel-size", "2", "--actor-num-nodes", "1"])
    assert (args.actor_num_gpus_per_node, args.world_size, args.data_parallel_size) == (2, 2, 1)


def test_default_flags_are_valid():
    assert _errors() == []


# --------------------------------------------------------------------------- validate_args collects


def test_validate_args_returns_every_error_at_once():
    errors = _errors("--micro-batch-size", 0, "--lr", -1, "--rollout-top-p", 1.5)
    assert isinstance(errors, list) and len(errors) == 3
    _one_naming(errors, "--micro-batch-size")
    _one_naming(errors, "--lr")
    _one_naming(errors, "--rollout-top-p")


def test_parse_args_raises_one_user_error_naming_all_problems():
    with pytest.raises(UserError) as info:
        parse_args(["--micro-batch-size", "0", "--lr", "-1", "--rollout-top-p", "1.5"])
    text = str(info.value)
    assert all(_names(text, f) for f in ("--micro-batch-size", "--lr", "--rollout-top-p"))
    assert "\n" not in text


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--tensor-model-parallel-size", 0], "--tensor-model-parallel-size"),
        (["--rollout-batch-size", -2], "--rollout-batch-size"),
        (["--n-samples-per-prompt", 0], "--n-samples-per-prompt"),
        (["--num-rollout", 0], "--num-rollout"),
        (["--global-batch-size", 0], "--global-batch-size"),
        (["--lr", 0], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--rollout-temperature", 0], "--rollout-temperature"),
        (["--rollout-top-p", 0], "--rollout-top-p"),
        (["--eval-temperature", -0.5], "--eval-temperature"),
        (["--eval-prompt-data", "arith"], "--eval-prompt-data"),
        (["--rm-type", "nope"], "--rm-type"),
        (["--use-kl-loss", "--kl-loss-coef", -0.1], "--kl-loss-coef"),
        (["--check-logprob-gap", -1], "--check-logprob-gap"),
        (["--reward-timeout", -1], "--reward-timeout"),
        (["--reward-timeout", "nan"], "--reward-timeout"),
        (["--actor-timeout", -0.5], "--actor-timeout"),
    ],
)
def test_each_bad_value_names_its_flag(argv, flag):
    errors = _errors(*argv)
    assert len(errors) == 1 and _names(errors[0], flag), errors


@pytest.mark.parametrize(
    "argv",
    [
        ["--rollout-top-p", 1.0],
        ["--eval-temperature", 0],
        ["--eval-prompt-data", "arith", "a.jsonl", "gsm", "b.jsonl"],
        ["--rm-type", "custom", "--custom-rm-path", "my.module:reward"],
        ["--kl-loss-coef", -0.1],  # only checked with --use-kl-loss
        ["--check-logprob-gap", 0],
        ["--reward-timeout", 0, "--actor-timeout", 0],  # 0: no limit
    ],
)
def test_boundary_values_are_accepted(argv):
    assert _errors(*argv) == []


def test_num_rollout_and_num_epoch_are_exclusive():
    errors = _errors("--num-rollout", 2, "--num-epoch", 1)
    _one_naming(errors, "--num-rollout", "--num-epoch")
    assert len(errors) == 1


def test_world_size_must_be_a_multiple_of_model_parallel():
    msg = _one_naming(_errors("--tensor-model-parallel-size", 2, "--actor-num-gpus-per-node", 3),
                      "--actor-num-gpus-per-node")
    assert "(3)" in msg and "(2)" in msg
    assert _errors("--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2,
                   "--actor-num-nodes", 2, "--actor-num-gpus-per-node", 2) == []


# --------------------------------------------------------------------------- LoRA flags


def test_lora_flags_are_not_checked_without_use_lora():
    assert _errors("--lora-r", 0, "--lora-alpha", 0, "--lora-target-modules", "nope") == []


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--lora-r", 0], "--lora-r"),
        (["--lora-r", -4], "--lora-r"),
        (["--lora-alpha", 0], "--lora-alpha"),
        (["--lora-alpha", -8], "--lora-alpha"),
        (["--lora-dropout", 1.0], "--lora-dropout"),
        (["--lora-dropout", -0.1], "--lora-dropout"),
    ],
)
def test_bad_lora_hyper_parameters_name_their_flag(argv, flag):
    errors = _errors("--use-lora", *argv)
    assert len(errors) == 1 and _names(errors[0], flag), errors


def test_unknown_lora_target_is_named():
    errors = _errors("--use-lora", "--lora-target-modules", "linear_qkv", "linear_qkvv")
    assert len(errors) == 1
    assert _names(errors[0], "--lora-target-modules") and "'linear_qkvv'" in errors[0]


@pytest.mark.parametrize(
    "targets",
    [
        ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ["all-linear"],
        ["*.layers.0.*.linear_qkv"],
        ["decoder.layers.?.mlp.linear_fc[12]"],
    ],
)
def test_known_names_hf_aliases_and_globs_are_accepted(targets):
    assert _errors("--use-lora", "--lora-target-modules", *targets) == []


def test_lora_recompute_input_with_dropout_is_collected_with_the_rest():
    errors = _errors("--use-lora", "--lora-recompute-input", "--lora-dropout", 0.1, "--lora-r", 0)
    assert len(errors) == 2
    _one_naming(errors, "--lora-recompute-input", "--lora-dropout")
    _one_naming(errors, "--lora-r")
    assert _errors("--use-lora", "--lora-recompute-input", "--lora-dropout", 0) == []


def test_lora_and_general_errors_are_collected_together():
    errors = _errors("--use-lora", "--lora-r", 0, "--lora-alpha", 0, "--lora-target-modules", "nope",
                     "--micro-batch-size", 0)
    assert len(errors) == 4
    for flag in ("--lora-r", "--lora-alpha", "--lora-target-modules", "--micro-batch-size"):
        _one_naming(errors, flag)
    with pytest.raises(UserError) as info:
        parse_args(["--use-lora", "--lora-r", "0", "--lora-alpha", "0", "--lora-target-modules", "nope"])
    assert all(_names(str(info.value), f) for f in ("--lora-r", "--lora-alpha", "--lora-target-modules"))


# --------------------------------------------------------------------------- argparse errors


@pytest.mark.parametrize(
    "argv, mentions",
    [
        (["--lora-r", "abc"], "--lora-r"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--advantage-estimator", "ppo"], "--advantage-estimator"),
        (["--lr"], "--lr"),
    ],
)
def test_parser_error_is_one_line_and_exit_status_2(capsys, argv, mentions):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == EXIT_USER_ERROR == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # no usage dump
    assert lines[0].startswith("error: ") and _names(lines[0], mentions) and "--help" in lines[0]


def test_parse_args_exits_the_same_way(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--lora-dropout", "half"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and _names(err, "--lora-dropout")
