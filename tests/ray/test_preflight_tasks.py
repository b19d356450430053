"""Start-up checks of a ``--lora-tasks`` run: every task's prompt files, eval files and reward are
checked as its one-task run would check them, each problem prefixed with the file and the task,
all of them in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from slime.ray.preflight import check_run
from slime.rollout.engines import vllm_options
from slime.utils.arguments import parse_args
from slime.utils.errors import UserError
from tests._support.tiny_rl import make_tiny_rl_checkpoint, write_prompts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_rl_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _argv(ckpt: Path, tasks_file: Path, *extra) -> list[str]:
    return ["--hf-checkpoint", str(ckpt), "--lora-tasks", str(tasks_file), "--use-lora", "--apply-chat-template",
            "--rollout-max-response-len", "12", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2",
            "--global-batch-size", "4", *map(str, extra)]


def _tasks(tmp_path: Path, tasks: list[dict]) -> Path:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(tasks))
    return path


def test_good_tasks_pass_without_prompt_data(ckpt, tmp_path):
    tasks = _tasks(tmp_path, [{"name": "add", "prompt_data": str(write_prompts(tmp_path / "a.jsonl", n=4)),
                               "eval_prompt_data": str(write_prompts(tmp_path / "e.jsonl", n=2))},
                              {"name": "mul", "prompt_data": str(write_prompts(tmp_path / "m.jsonl", n=4)), "r": 8}])
    check_run(parse_args(_argv(ckpt, tasks)))


def test_every_tasks_problems_in_one_line(ckpt, tmp_path):
    good = write_prompts(tmp_path / "good.jsonl", n=4)
    bad_label = tmp_path / "bad_label.jsonl"
    bad_label.write_text(json.dumps({"prompt": "what is 1+1?", "label": "two"}) + "\n")
    tasks = _tasks(tmp_path, [
        {"name": "add", "prompt_data": str(tmp_path / "missing.jsonl"),
         "eval_prompt_data": {"held": str(tmp_path / "missing_eval.jsonl")}},
        {"name": "mul", "prompt_data": str(good), "custom_rm_path": f"{tmp_path / 'nope.py'}:score"},
        {"name": "sub", "prompt_data": str(bad_label), "rm_type": "math"},
    ])
    with pytest.raises(UserError) as info:
        check_run(parse_args(_argv(ckpt, tasks)))
    message = str(info.value)
    assert "\n" not in message
    where = f"--lora-tasks {tasks}, task"
    assert f"{where} 'add': --prompt-data {tmp_path / 'missing.jsonl'}: no such file" in message
    assert f"{where} 'add': --eval-prompt-data held {tmp_path / 'missing_eval.jsonl'}: no such file" in message
    assert f"{where} 'mul': " in message and "nope.py" in message
    assert f"{where} 'sub': " in message and f"{bad_label}:1" in message
    assert "--prompt-data is required" not in message


def test_vllm_needs_two_adapter_slots_per_task_and_the_largest_rank(ckpt, tmp_path):
    prompts = str(write_prompts(tmp_path / "p.jsonl", n=4))
    tasks = _tasks(tmp_path, [{"name": "add", "prompt_data": prompts, "r": 4},
                              {"name": "mul", "prompt_data": prompts, "r": 24}])
    assert parse_args(_argv(ckpt, tasks, "--rollout-engine", "vllm")).vllm_max_loras == 4  # the default: 2 per task
    args = parse_args(_argv(ckpt, tasks, "--rollout-engine", "vllm", "--lora-r", "8", "--vllm-max-loras", "2"))
    with pytest.raises(UserError) as info:
        vllm_options(args)
    assert str(info.value) == (f"--vllm-max-loras 2: --lora-tasks {tasks} has 2 tasks and vLLM holds two versions "
                               "of each adapter while syncing; pass --vllm-max-loras 4 (or more)")
    with pytest.raises(UserError) as info:
        check_run(args)
    assert "--vllm-max-loras 2: --lora-tasks" in str(info.value)
    options = vllm_options(parse_args(_argv(ckpt, tasks, "--rollout-engine", "vllm", "--lora-r", "8",
                                            "--vllm-max-loras", "4")))
    assert (options.lora_rank, options.max_loras) == (24, 4)


def test_train_py_exits_2_with_one_line_naming_both_tasks(ckpt, tmp_path):
    tasks = _tasks(tmp_path, [{"name": "add", "prompt_data": str(tmp_path / "missing.jsonl")},
                              {"name": "mul", "prompt_data": str(write_prompts(tmp_path / "m.jsonl", n=4)),
                               "custom_rm_path": f"{tmp_path / 'nope.py'}:score"}])
    temp = Path(tempfile.mkdtemp(prefix="pt-"))  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": str(temp), "RAY_TMPDIR": str(temp)}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *_argv(ckpt, tasks)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, env=env)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-4000:]
    assert "task 'add': --prompt-data" in lines[0] and "task 'mul': " in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
