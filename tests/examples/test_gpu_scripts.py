"""The GPU recipes in examples/lora (Qwen3-4B, Qwen3-30B-A3B): their stops on a machine that cannot
run them, and the flags they hand to train.py, parsed by train.py's own parser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slime.utils.arguments import parse_args

ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

# script, GPUs it needs, expected parallel layout (TP, EP, trainer processes)
SCRIPTS = [
    ("run-qwen3-4B-lora.sh", 2, {"tensor_model_parallel_size": 2, "expert_model_parallel_size": 1,
                                 "actor_num_gpus_per_node": 2}),
    ("run-qwen3-30B-A3B-lora.sh", 8, {"tensor_model_parallel_size": 4, "expert_model_parallel_size": 8,
                                      "actor_num_gpus_per_node": 8}),
]
IDS = ["4B", "30B-A3B"]

# Stands in for python: the GPU check (`-c ...`) passes, train.py's arguments are written to a file.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-c" ]; then exit 0; fi
printf '%s\\n' "$@" > "$ARGV_FILE"
"""


def _run(script: str, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "examples" / "lora" / script), *extra], cwd="/",
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("script", "gpus", "layout"), SCRIPTS, ids=IDS)
def test_script_is_valid_bash(script, gpus, layout):
    result = subprocess.run(["bash", "-n", str(ROOT / "examples" / "lora" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("script", "gpus", "layout"), SCRIPTS, ids=IDS)
def test_too_few_gpus_is_one_line(script, gpus, layout):
    import torch

    if torch.cuda.device_count() >= gpus:
        pytest.skip(f"this machine has {gpus} GPUs or more")
    result = _run(script, {"PYTHON": str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable)})
    assert result.returncode == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert f"needs {gpus} GPUs" in result.stderr


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(("script", "gpus", "layout"), SCRIPTS, ids=IDS)
def test_missing_checkpoint_then_data_are_one_line(script, gpus, layout, fake_python, tmp_path):
    env = {"PYTHON": str(fake_python), "ARGV_FILE": str(tmp_path / "argv"),
           "HF_CKPT": str(tmp_path / "no-ckpt"), "PROMPT_DATA": str(tmp_path / "no-data.jsonl")}
    result = _run(script, env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no Hugging Face checkpoint" in result.stderr and "HF_CKPT=" in result.stderr

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    result = _run(script, {**env, "HF_CKPT": str(tmp_path / "ckpt")})
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no prompt data" in result.stderr and "PROMPT_DATA=" in result.stderr
    assert not (tmp_path / "argv").exists()  # train.py never started


@pytest.mark.parametrize(("script", "gpus", "layout"), SCRIPTS, ids=IDS)
def test_flags_reach_train_py_and_parse(script, gpus, layout, fake_python, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+1?", "label": "2"}\n')
    env = {"PYTHON": str(fake_python), "ARGV_FILE": str(tmp_path / "argv"), "HF_CKPT": str(tmp_path / "ckpt"),
           "PROMPT_DATA": str(tmp_path / "prompts.jsonl"), "EVAL_DATA": str(tmp_path / "no-eval.jsonl")}
    # as the usage line runs it, with --save; extra arguments override the script's (--lora-r)
    result = _run(script, env, "--save", str(tmp_path / "save"), "--lora-r", "8")
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[0] == "train.py"
    args = parse_args(argv[1:])
    assert {key: getattr(args, key) for key in layout} == layout
    assert args.lora.r == 8 and args.bf16 and args.sequence_parallel
    assert args.hf_checkpoint == str(tmp_path / "ckpt") and args.save == str(tmp_path / "save")
    assert set(args.lora_target_modules) == {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}
    if args.expert_model_parallel_size > 1:
        assert args.expert_tensor_parallel_size == 1 and args.moe_token_dispatcher_type == "alltoall"
