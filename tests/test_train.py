"""train.py end to end on a tiny model: the real CLI, Ray, megatron-core actors, the HF engine."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests._support.tiny_rl import make_tiny_rl_checkpoint, write_prompts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    ckpt = make_tiny_rl_checkpoint(root)
    return ckpt, write_prompts(root / "train.jsonl", n=64), write_prompts(root / "eval.jsonl", n=8, seed=1)


def run_train(*flags, timeout=600, env=None):
    import os

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, flags)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})})
    return proc


def common(ckpt, prompts, tmp):
    return ["--hf-checkpoint", ckpt, "--prompt-data", prompts, "--apply-chat-template", "--rollout-batch-size", 4,
            "--n-samples-per-prompt", 4, "--rollout-max-response-len", 12, "--custom-rm-path",
            f"{ROOT}/tests/_support/rewards.py:sevens", "--log-dir", tmp / "logs", "--seed", 3]


def rows(log_dir):
    return [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_three_rollouts(setup, tmp_path):
    ckpt, prompts, eval_prompts = setup
    proc = run_train(*common(ckpt, prompts, tmp_path), "--use-lora", "--lora-r", 4, "--lora-alpha", 8, "--lr", 1e-3,
                     "--num-rollout", 3, "--use-kl-loss", "--kl-loss-coef", 0.01, "--save", tmp_path / "save",
                     "--eval-prompt-data", "tiny", eval_prompts, "--eval-interval", 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "LoRA applied successfully!" in proc.stdout
    metrics = [r for r in rows(tmp_path / "logs") if r["rollout_id"] >= 0]
    assert [r["rollout_id"] for r in metrics] == [0, 1, 2]
    for r in metrics:
        for key in ("rollout/reward_mean", "rollout/response_len_mean", "rollout/tokens_per_second", "train/loss",
                    "train/grad_norm", "train/kl", "train/entropy", "train/rollout_logprob_abs_diff", "sync/bytes",
                    "sync/seconds", "perf/rollout_seconds", "perf/train_seconds", "perf/step_seconds"):
            assert key in r, key
        assert r["train/rollout_logprob_abs_diff"] <= 1e-3
    assert metrics[0]["train/kl"] == 0.0  # adapters start at B = 0: the policy is the reference
    first_eval = [r for r in rows(tmp_path / "logs") if r["rollout_id"] == -1]
    assert first_eval and "eval/tiny/reward_mean" in first_eval[0]
    # adapter-only sync: exactly the adapter's bytes (fp32), never the model's
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "save" / "adapter" / "adapter_model.safetensors"))
    assert metrics[1]["sync/bytes"] == sum(t.numel() * 4 for t in adapter.values())
    model_bytes = (Path(ckpt) / "model.safetensors").stat().st_size
    assert metrics[1]["sync/bytes"] < model_bytes
    # the saved adapter loads in peft
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt), tmp_path / "save" / "adapter")
    assert peft_model(torch.tensor([[1, 5, 7]])).logits.shape[-1] == 48
