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
    vocab = peft_model.config.vocab_size
    assert peft_model(torch.tensor([[1, 5, 7]])).logits.shape[-1] == vocab


def first_step(tmp_path, ckpt, prompts, *flags):
    proc = run_train(*common(ckpt, prompts, tmp_path), "--use-lora", "--lora-r", 4, "--lora-alpha", 8, "--lr", 1e-3,
                     "--num-rollout", 1, *flags)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return rows(tmp_path / "logs")[0]


def test_tp2_first_step_equals_tp1(setup, tmp_path):
    ckpt, prompts, _ = setup
    tp1 = first_step(tmp_path / "tp1", ckpt, prompts)
    tp2 = first_step(tmp_path / "tp2", ckpt, prompts, "--tensor-model-parallel-size", 2)
    assert tp2["rollout/reward_mean"] == tp1["rollout/reward_mean"]  # same samples
    assert tp2["train/loss"] == pytest.approx(tp1["train/loss"], rel=1e-5, abs=1e-7)
    assert tp2["train/grad_norm"] == pytest.approx(tp1["train/grad_norm"], rel=1e-5)


def test_kill_then_load_resumes_exactly(setup, tmp_path):
    """SIGKILL mid-run (after a checkpoint, wherever the run is), then --load: the remaining rollouts are
    bit-identical to an uninterrupted run's. The kill point is whatever checkpoint was newest when the
    poller saw it; the test only needs one checkpoint behind and rollouts still to go."""
    import os
    import signal
    import time

    ckpt, prompts, _ = setup
    num_rollout = 6
    flags = [*common(ckpt, prompts, tmp_path / "a"), "--use-lora", "--lora-r", 4, "--lr", 1e-2, "--num-rollout", num_rollout]
    full = run_train(*flags)
    assert full.returncode == 0, full.stderr[-3000:]
    reference = {r["rollout_id"]: r for r in rows(tmp_path / "a" / "logs")}

    save = tmp_path / "save"
    flags_b = [*common(ckpt, prompts, tmp_path / "b"), "--use-lora", "--lora-r", 4, "--lr", 1e-2, "--num-rollout", num_rollout,
               "--save", save, "--save-interval", 1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, flags_b)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    latest = save / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (latest.exists() and int(latest.read_text()) >= 1):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = int(latest.read_text())
    assert 1 <= killed_after <= num_rollout - 2, killed_after  # a checkpoint behind, rollouts still ahead

    resumed = run_train(*flags_b, "--load", save)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = {r["rollout_id"]: r for r in rows(tmp_path / "b" / "logs")}
    for rollout_id in range(killed_after + 1, num_rollout):
        for key in ("rollout/reward_mean", "train/loss", "train/grad_norm", "rollout/response_len_mean"):
            assert after[rollout_id][key] == reference[rollout_id][key], (rollout_id, key)


@pytest.mark.slow
def test_tiny_policy_learns(setup, tmp_path):
    ckpt, prompts, _ = setup
    proc = run_train(*common(ckpt, prompts, tmp_path), "--use-lora", "--lora-r", 8, "--lora-alpha", 16, "--lr", 2e-2,
                     "--num-rollout", 30, "--rollout-batch-size", 8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rewards = [r["rollout/reward_mean"] for r in rows(tmp_path / "logs")]
    assert sum(rewards[-5:]) / 5 > 2 * sum(rewards[:5]) / 5 + 0.05, rewards
