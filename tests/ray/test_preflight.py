"""Start-up checks (slime/ray/preflight.py): every problem a run can know before Ray starts ends
in one line naming the flag or file:line and the fix, all of them together."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from slime.ray.preflight import check_run, output_dir_errors
from slime.utils.arguments import parse_args
from slime.utils.errors import UserError
from tests._support.tiny_rl import make_tiny_rl_checkpoint, write_prompts

ROOT = Path(__file__).resolve().parents[2]
# The tiny RL model: 128 positions, one token per character; with --rollout-max-response-len 12 a prompt
# may have 116 tokens.  The chat template adds 5 tokens to a user message.
LIMIT = "116 tokens (max_position_embeddings 128 - --rollout-max-response-len 12)"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_rl_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def prompts(tmp_path) -> Path:
    return write_prompts(tmp_path / "train.jsonl", n=8)


def _args(ckpt: Path, prompts: Path, *extra):
    return parse_args(["--hf-checkpoint", str(ckpt), "--prompt-data", str(prompts), "--apply-chat-template",
                       "--rollout-max-response-len", "12", *map(str, extra)])


def _error(ckpt: Path, prompts: Path, *extra) -> str:
    with pytest.raises(UserError) as info:
        check_run(_args(ckpt, prompts, *extra))
    message = str(info.value)
    assert "\n" not in message
    return message


def _rows(path: Path, contents: list) -> Path:
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": c}], "label": "1"}) + "\n"
                            for c in contents))
    return path


def test_a_good_run_passes_and_creates_its_output_directories(ckpt, prompts, tmp_path, capsys):
    save, logs = tmp_path / "out" / "save", tmp_path / "logs"
    check_run(_args(ckpt, prompts, "--save", save, "--log-dir", logs, "--use-lora", "--lora-r", 32,
                    "--eval-prompt-data", "tiny", prompts))
    assert save.is_dir() and logs.is_dir()
    assert list(save.iterdir()) == [] and list(logs.iterdir()) == []  # the probe files are gone
    out = capsys.readouterr().out
    assert f"created the --save directory {save}\n" in out and f"created the --log-dir directory {logs}\n" in out
    check_run(_args(ckpt, prompts, "--save", save, "--log-dir", logs))  # existing, writable: nothing to say
    assert "created" not in capsys.readouterr().out


# ---------------------------------------------------------------- prompt files


def test_a_prompt_file_that_is_not_utf8_names_file_and_line(ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "what is 1+1?"}\n{"prompt": "caf\xe9"}\n')
    assert _error(ckpt, bad) == (f"--prompt-data {bad}:2: not UTF-8 text (byte 0xe9 at column 16); "
                                 "save the file as UTF-8")


def test_an_eval_file_that_is_not_utf8_names_its_flag(ckpt, prompts, tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_bytes(b'{"prompt": "\xff"}\n')
    message = _error(ckpt, prompts, "--eval-prompt-data", "tiny", bad)
    assert message.startswith(f"--eval-prompt-data {bad}:1: not UTF-8 text")


def test_a_100k_character_prompt_fails_at_start_up(ckpt, tmp_path):
    long = _rows(tmp_path / "long.jsonl", ["what is 1+1?", "7" * 100_000])
    start = time.monotonic()
    message = _error(ckpt, long)
    assert message == (f"{long}:2: the prompt is 100005 tokens, over the limit of {LIMIT}; shorten it, lower "
                       "--rollout-max-response-len, or pass --over-long-prompts drop (or truncate)")
    assert time.monotonic() - start < 10


def test_prompts_are_rendered_as_the_rollout_renders_them(ckpt, tmp_path):
    # 112 characters fit as raw text; the chat template's 5 tokens make 117, one over the limit.
    path = _rows(tmp_path / "p.jsonl", ["7" * 112])
    assert _error(ckpt, path).startswith(f"{path}:1: the prompt is 117 tokens, over the limit of {LIMIT}")
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"prompt": "7" * 112, "label": "7"}) + "\n")
    check_run(parse_args(["--hf-checkpoint", str(ckpt), "--prompt-data", str(raw), "--rollout-max-response-len", "12"]))


def test_eval_sets_are_held_to_the_eval_response_length(ckpt, prompts, tmp_path):
    evals = _rows(tmp_path / "eval.jsonl", ["7" * 90])  # 95 tokens: fits 128 - 12, not 128 - 40
    check_run(_args(ckpt, prompts, "--eval-prompt-data", "tiny", evals))
    message = _error(ckpt, prompts, "--eval-prompt-data", "tiny", evals, "--eval-max-response-len", 40)
    assert message.startswith(f"{evals}:1: the prompt is 95 tokens, over the limit of 88 tokens "
                              "(max_position_embeddings 128 - --eval-max-response-len 40); shorten it, lower "
                              "--eval-max-response-len")


def test_a_response_length_that_leaves_no_room_is_reported_once(ckpt, prompts):
    message = _error(ckpt, prompts, "--rollout-max-response-len", 128, "--eval-prompt-data", "a", prompts)
    assert message == ("--rollout-max-response-len 128 leaves no room for a prompt in the model's 128 positions "
                       "(max_position_embeddings); lower it")


@pytest.mark.parametrize("policy, what", [("drop", "left out"), ("truncate", "cut to their last 116 tokens")])
def test_drop_and_truncate_pass_with_a_warning(ckpt, tmp_path, capsys, policy, what):
    path = _rows(tmp_path / "p.jsonl", ["what is 1+1?", "7" * 200, "7" * 300])
    check_run(_args(ckpt, path, "--over-long-prompts", policy))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--over-long-prompts" in line]
    assert warnings == [(f"warning: --over-long-prompts {policy}: 2 of 3 prompts of {path} are over the "
                                       f"limit of {LIMIT} and were {what} (first: {path}:2, 205 tokens)")]


def test_empty_prompt_files_fail_at_start_up(ckpt, prompts, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert _error(ckpt, empty) == f"--prompt-data {empty}: the file holds no prompts"
    assert _error(ckpt, prompts, "--eval-prompt-data", "e", empty) == (
        f"--eval-prompt-data {empty}: the file holds no prompts")


def test_rows_the_dataset_refuses_fail_at_start_up(ckpt, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "what is 1+1?"}) + "\n")
    assert _error(ckpt, path) == f"{path}:1: no 'prompt' field (set --input-key to the prompt field)"


def test_a_checkpoint_without_a_tokenizer_fails_at_start_up(prompts, tmp_path):
    from tests._support.tiny_models import make_tiny_checkpoint

    bare = make_tiny_checkpoint(tmp_path)
    assert _error(bare, prompts) == (f"--hf-checkpoint {bare}: no tokenizer could be loaded there (the rollout "
                                     "tokenises the prompts with it); copy the model's tokenizer files next to its "
                                     "config.json")


# ---------------------------------------------------------------- output directories


def test_an_output_path_that_is_a_file(ckpt, prompts, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert _error(ckpt, prompts, "--save", a_file) == (f"--save {a_file}: a file, not a directory; pass a directory "
                                                       "(or move the file away)")
    assert _error(ckpt, prompts, "--log-dir", a_file / "logs") == (
        f"--log-dir {a_file / 'logs'}: {a_file} is not a directory; pass a path under a directory")


def _drop_dac_override() -> None:
    """In a child of root: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so permissions hold for it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0):  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _output_dir_errors_where_permissions_hold(dirs: list[tuple[str, Path]]) -> list[str]:
    """``output_dir_errors(dirs)`` in this process, or for root (who writes anywhere) in a child
    without the capabilities that let root ignore permissions; skipped where neither can be had."""
    if os.geteuid() != 0:
        return output_dir_errors(dirs)[0]
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        from slime.ray.preflight import output_dir_errors
        print(json.dumps(output_dir_errors({[(f, str(d)) for f, d in dirs]!r})[0]))
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              preexec_fn=_drop_dac_override)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE for a child ({exc})")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture
def read_only(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    yield directory
    directory.chmod(0o755)


def test_a_read_only_output_directory(read_only):
    assert _output_dir_errors_where_permissions_hold([("--save", read_only)]) == [
        f"--save {read_only}: cannot write there (Permission denied); pass a writable directory or fix its permissions"]


def test_an_output_directory_under_a_read_only_parent(read_only):
    target = read_only / "logs" / "run"
    assert _output_dir_errors_where_permissions_hold([("--log-dir", target)]) == [
        f"--log-dir {target}: cannot create {read_only / 'logs'} (Permission denied); pass a writable path or fix "
        f"the permissions of {read_only}"]
    assert list(read_only.iterdir()) == []


def test_directories_made_for_a_run_that_fails_are_removed(ckpt, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    save = tmp_path / "a" / "b" / "save"
    _error(ckpt, empty, "--save", save)
    assert not (tmp_path / "a").exists() and "created" not in capsys.readouterr().out


# ---------------------------------------------------------------- LoRA rank


def test_a_lora_rank_above_every_module_is_one_short_line(ckpt, prompts):
    message = _error(ckpt, prompts, "--use-lora", "--lora-r", 100000)
    assert message == ("--lora-r 100000 exceeds the smaller dimension of 8 target modules "
                       "(decoder.layers.*.self_attention.linear_qkv x2: 32, "
                       "decoder.layers.*.self_attention.linear_proj x2: 32, decoder.layers.*.mlp.linear_fc1 x2: 32, "
                       "decoder.layers.*.mlp.linear_fc2 x2: 32); "
                       "use --lora-r <= 32")


def test_a_lora_rank_above_some_modules_names_only_those(tmp_path, prompts):
    narrow = make_tiny_rl_checkpoint(tmp_path, intermediate_size=16)  # linear_fc2: [32, 16]
    assert _error(narrow, prompts, "--use-lora", "--lora-r", 20) == (
        "--lora-r 20 exceeds the smaller dimension of 2 target modules (decoder.layers.*.mlp.linear_fc2 x2: 16); "
        "use --lora-r <= 16")
    check_run(_args(narrow, prompts, "--use-lora", "--lora-r", 20, "--lora-target-modules", "q_proj", "o_proj"))
    one_module = ("--use-lora", "--lora-r", 20, "--lora-target-modules", "*.layers.1.*.linear_fc2")
    assert _error(narrow, prompts, *one_module) == (
        "--lora-r 20 exceeds the smaller dimension of 1 target module (decoder.layers.1.mlp.linear_fc2: 16); "
        "use --lora-r <= 16")


def _lora_error_in_the_trainer(rank, flags):
    from slime.backends.megatron_utils.arch import ModelArch
    from slime.backends.megatron_utils.model import initialize_model_and_optimizer
    from slime.utils.errors import UserError

    args = parse_args(flags)
    try:
        initialize_model_and_optimizer(args, arch=ModelArch.from_checkpoint(args.hf_checkpoint))
    except UserError as exc:
        return str(exc)
    return None


def test_preflight_says_what_the_trainer_would_say(tmp_path, prompts):
    """The shapes preflight computes from config.json are the real model's: same message, same count."""
    from tests._support.dist import run_distributed

    narrow = make_tiny_rl_checkpoint(tmp_path, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                                     head_dim=8)  # linear_qkv [32, 32], linear_proj [32, 16], linear_fc2 [32, 16]
    flags = ["--hf-checkpoint", str(narrow), "--prompt-data", str(prompts), "--apply-chat-template",
             "--rollout-max-response-len", "12", "--use-lora", "--lora-r", "20"]
    (in_trainer,) = run_distributed(_lora_error_in_the_trainer, 1, args=(flags,))
    with pytest.raises(UserError) as info:
        check_run(parse_args(flags))
    assert str(info.value) == in_trainer == (
        "--lora-r 20 exceeds the smaller dimension of 4 target modules (decoder.layers.*.self_attention.linear_proj "
        "x2: 16, decoder.layers.*.mlp.linear_fc2 x2: 16); use --lora-r <= 16")


# ---------------------------------------------------------------- everything together, and the real command line


def test_every_problem_is_reported_together(ckpt, tmp_path):
    empty, a_file = tmp_path / "empty.jsonl", tmp_path / "file"
    empty.write_text("")
    a_file.write_text("x")
    bad_eval = tmp_path / "eval.jsonl"
    bad_eval.write_bytes(b"\xff\n")
    message = _error(ckpt, empty, "--eval-prompt-data", "e", bad_eval, "--save", a_file, "--use-lora",
                     "--lora-r", 64)
    assert message == "; ".join([
        "--lora-r 64 exceeds the smaller dimension of 8 target modules (decoder.layers.*.self_attention.linear_qkv "
        "x2: 32, decoder.layers.*.self_attention.linear_proj x2: 32, decoder.layers.*.mlp.linear_fc1 x2: 32, "
        "decoder.layers.*.mlp.linear_fc2 x2: 32); use --lora-r <= 32",
        f"--prompt-data {empty}: the file holds no prompts",
        f"--eval-prompt-data {bad_eval}:1: not UTF-8 text (byte 0xff at column 1); save the file as UTF-8",
        f"--save {a_file}: a file, not a directory; pass a directory (or move the file away)",
    ])


def test_train_py_fails_in_seconds_with_one_line_and_no_ray(ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "what is 1+1?"}\n{"prompt": "what is \xe9?"}\n')
    temp = Path(tempfile.mkdtemp(prefix="sp-"))  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": str(temp), "RAY_TMPDIR": str(temp)}
    start, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, str(ROOT / "train.py"), "--hf-checkpoint", str(ckpt), "--prompt-data", str(bad),
               "--rollout-max-response-len", "12", "--save", str(tmp_path / "save")]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    seconds, after = time.monotonic() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    started_ray = [p.name for p in temp.iterdir() if "ray" in p.name]
    subprocess.run(["rm", "-rf", str(temp)], check=True)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stderr.splitlines() == [f"error: --prompt-data {bad}:2: not UTF-8 text (byte 0xe9 at column 21); "
                                        "save the file as UTF-8"]
    assert started_ray == []  # Ray never started
    assert not (tmp_path / "save").exists()  # and nothing was left behind
    # About 5 s of imports and checks; wall time also counts whatever else this machine runs (a CI
    # job on 2 cores made it 17 s), so the bound on it is loose and the one on CPU time tight.
    assert cpu_seconds < 20 and seconds < 60, (cpu_seconds, seconds)


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory) -> Path:
    return make_tiny_rl_checkpoint(tmp_path_factory.mktemp("moe"), family="qwen3_moe")


def test_expert_layouts_the_model_cannot_take_are_named_together(moe_ckpt, prompts):
    message = _error(moe_ckpt, prompts, "--expert-model-parallel-size", 3, "--actor-num-gpus-per-node", 3)
    assert "--expert-model-parallel-size 3 does not divide the model's 4 experts" in message
    message = _error(moe_ckpt, prompts, "--expert-tensor-parallel-size", 2, "--tensor-model-parallel-size", 2)
    assert "pass --expert-tensor-parallel-size 1" in message and "needs --sequence-parallel" in message


def test_a_dense_model_refuses_expert_parallelism(ckpt, prompts):
    assert "the model has no experts" in _error(ckpt, prompts, "--expert-model-parallel-size", 2,
                                                "--actor-num-gpus-per-node", 2)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU-only refusal")
def test_vllm_lora_on_an_moe_model_is_refused_on_cpus(moe_ckpt, prompts):
    message = _error(moe_ckpt, prompts, "--use-lora", "--rollout-engine", "vllm")
    assert "vLLM on CPUs cannot run LoRA on mixture-of-experts models" in message
    assert "--rollout-engine hf" in message


def test_partial_expert_targets_for_vllm_are_named():
    from slime.backends.megatron_utils.arch import ModelArch
    from slime.ray.preflight import _vllm_moe_errors

    arch = ModelArch.from_hf_config({"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2,
                                     "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
                                     "vocab_size": 10, "num_experts": 2, "moe_intermediate_size": 4,
                                     "num_experts_per_tok": 1})
    fc2 = {n for n in arch.linear_shapes() if n.endswith("linear_fc2")}
    whole = {n for n in arch.linear_shapes() if ".local_experts." in n}
    one_expert = {n for n in whole if ".local_experts.0." in n}
    for partial in (fc2, one_expert):
        assert "target both linear_fc1 and linear_fc2" in _vllm_moe_errors(partial, arch, on_gpu=True)[0]
    assert _vllm_moe_errors(whole, arch, on_gpu=True) == [] and _vllm_moe_errors(set(), arch, on_gpu=True) == []
    assert "vLLM on CPUs" in _vllm_moe_errors(whole, arch, on_gpu=False)[0]
