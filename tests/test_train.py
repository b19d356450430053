"""train.py end to end on a tiny model: the real CLI, Ray, megatron-core actors, the HF engine."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests._support.numerics import assert_close
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


@pytest.mark.numerics
def test_lora_run_three_rollouts(setup, tmp_path, single_process):
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
        # engine (transformers + peft) vs trainer (megatron-core): the run's own bound, --check-logprob-gap's default
        assert_close(r["train/rollout_logprob_abs_diff"], 0.0, atol=1e-3, rtol=0, what="engine vs trainer gap")
    assert metrics[0]["train/kl"] == 0.0  # adapters start at B = 0: the policy is the reference
    first_eval = [r for r in rows(tmp_path / "logs") if r["rollout_id"] == -1]
    assert first_eval and "eval/tiny/reward_mean" in first_eval[0]
    # adapter-only sync: exactly the adapter's bytes (fp32), never the model's
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "save" / "adapter" / "adapter_model.safetensors"))
    assert metrics[1]["sync/bytes"] == sum(t.numel() * 4 for t in adapter.values())
    model_bytes = (Path(ckpt) / "model.safetensors").stat().st_size
    assert metrics[1]["sync/bytes"] < model_bytes
    # The saved adapter, loaded by peft, gives the trainer's log-probs on the same tokens.
    from tests._support.logprobs import hf_logprobs, peft_logprobs

    adapter = tmp_path / "save" / "adapter"
    tokens = chat_tokens(ckpt, [("what is 3+4?", "7 is 7."), ("what is 9+8?", "17 = 17")])
    in_peft = peft_logprobs(ckpt, adapter, tokens)
    assert (in_peft - hf_logprobs(ckpt, tokens)).abs().max() > 10 * PEFT_LOGPROB_ATOL  # the adapter has learned
    assert_close(in_peft, trainer_logprobs(ckpt, adapter, tokens), atol=PEFT_LOGPROB_ATOL, rtol=0,
                 what="saved adapter: peft vs trainer")


# fp32 log-probs of one adapter computed by peft (separate q/k/v and gate/up projections) and by the
# trainer's megatron-core network (fused ones): the same math in another order of roundings.
PEFT_LOGPROB_ATOL = 1e-4


def chat_tokens(ckpt, pairs) -> "torch.Tensor":
    """``[b, s]`` ids of chat-formatted (prompt, response) pairs; the pairs must tokenize to one length."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    rows = []
    for prompt, response in pairs:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        rows.append(tokenizer(text + response, add_special_tokens=False)["input_ids"])
    return torch.tensor(rows)


def trainer_logprobs(ckpt, adapter, tokens) -> "torch.Tensor":
    """The trainer's network on ``tokens``: base checkpoint plus ``adapter`` through the trainer's own
    loader (``--lora-adapter-path``; ``--load`` reads checkpoints with it too), in this process at TP=1.

    That this is the trainer's state at the end of the run, not just our own reading of the file,
    rests on ``test_kill_then_load_resumes_exactly``: training resumed through this loader is
    bit-identical to the uninterrupted run."""
    from slime.backends.megatron_utils.model import initialize_model_and_optimizer
    from slime.utils.arguments import parse_args
    from tests._support.logprobs import megatron_logprobs

    args = parse_args(["--hf-checkpoint", str(ckpt), "--use-lora", "--lora-r", "4", "--lora-alpha", "8",
                       "--lora-adapter-path", str(adapter)])
    built = initialize_model_and_optimizer(args)
    for chunk in built.model:
        chunk.eval()
    return megatron_logprobs(built.model, built.arch, tokens)


# Parallel runs differ from the single-process run only in the order of fp32 roundings (TP shards,
# DP sums), so every metric agrees to a few ulps of its summands.  The loss is a token mean of
# advantage-weighted ratios (|advantage| ~ 1) that cancel to ~1e-3, so its rounding error is
# absolute (~1e-8 here), not relative to its small value: it also gets PARALLEL_LOSS_ATOL.
PARALLEL_RTOL = 1e-5
PARALLEL_LOSS_ATOL = 1e-7
# Mean |engine - trainer| log-prob gap of a parallel run (fp32; ~2e-7 measured): the engine got the
# adapter the TP shards or DP replicas trained, not merely one under the run's 1e-3 bound.
PARALLEL_ENGINE_GAP = 1e-5
# Two optimizer steps per rollout (--global-batch-size 8 of 16 samples): the second step's ratios
# are not 1, so the loss depends on the model; KL against the adapters-off reference shows the
# adapters have moved (lr 1e-2).
PARALLEL_FLAGS = ["--use-lora", "--lora-r", 4, "--lora-alpha", 8, "--lr", 1e-2, "--num-rollout", 3,
                  "--global-batch-size", 8, "--use-kl-loss", "--kl-loss-coef", 0.01]


def parallel_metrics(tmp_path, ckpt, prompts, *flags) -> dict[int, dict]:
    proc = run_train(*common(ckpt, prompts, tmp_path), *PARALLEL_FLAGS, *flags)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {r["rollout_id"]: r for r in rows(tmp_path / "logs") if r["rollout_id"] >= 0}


@pytest.fixture(scope="module")
def single_process_run(setup, tmp_path_factory):
    """The reference for every parallel configuration: one trainer, TP=1, DP=1."""
    ckpt, prompts, _ = setup
    return parallel_metrics(tmp_path_factory.mktemp("single"), ckpt, prompts)


@pytest.mark.parametrize("flags", [
    pytest.param(["--tensor-model-parallel-size", 2], id="tp2"),
    pytest.param(["--actor-num-gpus-per-node", 2], id="dp2"),  # two trainers at TP=1: DP=2
    pytest.param(["--tensor-model-parallel-size", 2, "--sequence-parallel"], id="tp2-sp"),
])
@pytest.mark.numerics
def test_parallel_run_equals_single_process_at_every_rollout(setup, single_process_run, tmp_path, flags):
    """Three rollouts of LoRA GRPO: rewards (same samples), loss, grad norm and KL equal the
    single-process run's at every rollout, after the adapters have learned something."""
    ckpt, prompts, _ = setup
    reference = single_process_run
    assert sorted(reference) == [0, 1, 2]
    # The adapters moved: the policy is no longer the reference (B = 0) policy, and the
    # comparison is not of untrained states.
    assert all(reference[i]["train/kl"] > 1e-3 for i in (1, 2)), [reference[i]["train/kl"] for i in (1, 2)]
    assert len({round(reference[i]["train/grad_norm"], 6) for i in range(3)}) == 3

    parallel = parallel_metrics(tmp_path, ckpt, prompts, *flags)
    assert sorted(parallel) == [0, 1, 2]
    for i in range(3):
        for key in ("rollout/reward_mean", "train/grad_norm", "train/kl"):
            assert_close(parallel[i][key], reference[i][key], rtol=PARALLEL_RTOL, atol=0.0, what=f"rollout {i} {key}")
        assert_close(parallel[i]["train/loss"], reference[i]["train/loss"], rtol=PARALLEL_RTOL,
                     atol=PARALLEL_LOSS_ATOL, what=f"rollout {i} train/loss")
        assert parallel[i]["train/rollout_logprob_abs_diff"] <= PARALLEL_ENGINE_GAP, (i, parallel[i])


def test_two_engines_share_each_rollout_and_both_get_every_adapter(setup, single_process_run, tmp_path):
    """--rollout-num-engines 2: each engine samples half of every rollout's groups; both receive each
    step's adapter (twice the sync bytes), so every sample's log-probs match the trainer's."""
    ckpt, prompts, _ = setup
    two = parallel_metrics(tmp_path, ckpt, prompts, "--rollout-num-engines", 2)
    assert sorted(two) == [0, 1, 2]
    for i in range(3):
        assert two[i]["sync/bytes"] == 2 * single_process_run[i]["sync/bytes"] > 0, (i, two[i])
        assert two[i]["sync/tensors"] == 2 * single_process_run[i]["sync/tensors"], (i, two[i])
        assert two[i]["train/rollout_logprob_abs_diff"] <= PARALLEL_ENGINE_GAP, (i, two[i])


def run_train_with_perturbed_engine(*flags, timeout=600):
    """``train.py FLAGS`` whose rollout engine adds noise to every adapter B it receives (see
    ``tests/_support/perturbed_engine.py``): it samples from another policy than the trainer's."""
    import os

    entry = "from tests._support.perturbed_engine import main; main()"
    return subprocess.run([sys.executable, "-c", entry, *map(str, flags)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def test_engine_on_a_perturbed_adapter_fails_the_run_in_one_step(setup, tmp_path):
    """The trainer's log-probs are compared with the engine's on every rollout: an engine sampling
    from the wrong adapter stops the run at rollout 0 with one line naming the flag (default 1e-3
    in fp32); ``--check-logprob-gap 0`` disables the check and the same run completes."""
    ckpt, prompts, _ = setup
    flags = ["--use-lora", "--lora-r", 4, "--lora-alpha", 8, "--lr", 1e-3, "--num-rollout", 2]
    failed = run_train_with_perturbed_engine(*common(ckpt, prompts, tmp_path / "checked"), *flags)
    assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-5000:]
    last = [line for line in failed.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: rollout 0: mean |logp_rollout - logp_train| = "), last
    assert "exceeds --check-logprob-gap 0.001: the rollout engine is not sampling from the trained weights" in last, last
    assert "Traceback" not in failed.stderr, failed.stderr[-5000:]
    assert "rollout 0 |" not in failed.stdout  # no step completed

    unchecked = run_train_with_perturbed_engine(*common(ckpt, prompts, tmp_path / "unchecked"), *flags,
                                                "--check-logprob-gap", 0)
    assert unchecked.returncode == 0, unchecked.stdout[-3000:] + unchecked.stderr[-5000:]
    metrics = [r for r in rows(tmp_path / "unchecked" / "logs") if r["rollout_id"] >= 0]
    assert [r["rollout_id"] for r in metrics] == [0, 1]
    # The perturbation is still there (the gap is measured, far above the default bound); only the check is off.
    assert all(r["train/rollout_logprob_abs_diff"] > 1e-2 for r in metrics), metrics


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


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def _engine_pid(driver_pid: int, wait_s: float = 60) -> int:
    """The rollout engine's process: a descendant of the driver (via raylet) titled ``ray::HFRolloutEngine...``."""
    import time

    import psutil

    deadline = time.time() + wait_s
    while True:
        found = []
        for child in psutil.Process(driver_pid).children(recursive=True):
            try:
                if " ".join(child.cmdline()).startswith("ray::HFRolloutEngine"):
                    found.append(child.pid)
            except psutil.Error:
                pass
        if len(found) == 1 or time.time() > deadline:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.1)


def _signal_engine_after_a_checkpoint(setup, tmp_path, sig, *flags) -> tuple[subprocess.CompletedProcess, list, int, float]:
    """Start a long LoRA run with a checkpoint every rollout; once the first is written, send ``sig`` to
    the rollout engine.  Returns the finished run (stderr as text), its argv, the engine's pid and the
    seconds from the signal to the run's end."""
    import os
    import signal
    import time

    ckpt, prompts, _ = setup
    save = tmp_path / "save"
    argv = [sys.executable, str(ROOT / "train.py"),
            *map(str, [*common(ckpt, prompts, tmp_path), "--use-lora", "--lora-r", 4, "--num-rollout", 1000,
                       "--save", save, "--save-interval", 1, *flags])]
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, start_new_session=True,
                                env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    engine = None
    try:
        latest = save / "latest_checkpointed_iteration.txt"
        deadline = time.time() + 600
        while proc.poll() is None and not latest.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and latest.exists(), (tmp_path / "stderr").read_text()[-3000:]
        engine = _engine_pid(proc.pid)
        os.kill(engine, sig)
        signalled_at = time.time()
        proc.wait(timeout=180)
        ended_after = time.time() - signalled_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if engine is not None and sig == signal.SIGSTOP:
            try:  # a stopped process cannot notice its raylet is gone
                os.kill(engine, signal.SIGKILL)
            except ProcessLookupError:
                pass
    result = subprocess.CompletedProcess(argv, proc.returncode, (tmp_path / "stdout").read_text(),
                                         (tmp_path / "stderr").read_text())
    return result, argv, engine, ended_after


def _assert_resume_report(last: str, argv: list, save: Path, log_dir: Path) -> None:
    """``...; newest checkpoint: SAVE/iter_N (rollout N); resume with: ARGV --load SAVE; details: LOG``."""
    import shlex

    iteration = int(last.split("(rollout ")[1].split(")")[0])
    assert last.split("; ")[1] == f"newest checkpoint: {save}/iter_{iteration:07d} (rollout {iteration})", last
    assert iteration >= 0 and (save / f"iter_{iteration:07d}" / "checkpoint.json").is_file()
    resume = last.split("; resume with: ")[1].split("; details: ")[0]
    assert shlex.split(resume) == [*argv, "--load", str(save)], resume
    assert last.endswith(f"; details: {log_dir / 'actor_failure.log'}")


@pytest.mark.slow
def test_a_killed_engine_ends_the_run_with_one_line_and_the_resume_command(setup, tmp_path):
    """SIGKILL the rollout engine after a checkpoint: the run ends within seconds with exit status 3 and
    one stderr line naming the engine and its pid, Ray's exit cause, the newest checkpoint and the exact
    command that resumes from it; the Ray traceback is in --log-dir, not on stderr."""
    import signal

    from slime.utils.errors import EXIT_RESUMABLE as EXIT_ACTOR_FAILURE

    proc, argv, engine, ended_after = _signal_engine_after_a_checkpoint(setup, tmp_path, signal.SIGKILL)
    assert proc.returncode == EXIT_ACTOR_FAILURE, proc.stderr[-3000:]
    assert ended_after < 30, ended_after
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    last = _last_line(proc.stderr)
    assert last.startswith(f"error: the rollout engine (pid {engine}) died (SYSTEM_ERROR: "), last
    _assert_resume_report(last, argv, tmp_path / "save", tmp_path / "logs")
    assert "ActorDiedError" in (tmp_path / "logs" / "actor_failure.log").read_text()


@pytest.mark.slow
def test_a_hung_engine_ends_the_run_after_actor_timeout(setup, tmp_path):
    """SIGSTOP the rollout engine (alive, never answering): after --actor-timeout the run ends with the same
    kind of line, naming the engine, the call it hangs in and the deadline."""
    import signal

    from slime.utils.errors import EXIT_RESUMABLE as EXIT_ACTOR_FAILURE

    proc, argv, engine, ended_after = _signal_engine_after_a_checkpoint(setup, tmp_path, signal.SIGSTOP,
                                                                        "--actor-timeout", 15)
    assert proc.returncode == EXIT_ACTOR_FAILURE, proc.stderr[-3000:]
    assert 15 <= ended_after < 45, ended_after
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    last = _last_line(proc.stderr)
    assert last.startswith(f"error: the rollout engine (pid {engine}) has not returned from "), last
    assert " after 15 s (--actor-timeout 15); " in last, last
    _assert_resume_report(last, argv, tmp_path / "save", tmp_path / "logs")


@pytest.mark.slow
def test_a_hung_reward_function_ends_the_run_in_one_line(setup, tmp_path):
    """A --custom-rm-path function that never returns, under --reward-timeout 2: the run ends a few
    seconds after the call started, with one line naming the function, the sample and the flag (a later
    --custom-rm-path overrides common()'s)."""
    import time

    ckpt, prompts, _ = setup
    marker = tmp_path / "hang-started"
    flags = [*common(ckpt, prompts, tmp_path), "--custom-rm-path", f"{ROOT}/tests/_support/rewards.py:hangs",
             "--reward-timeout", 2, "--use-lora", "--num-rollout", 2]
    proc = run_train(*flags, timeout=300, env={"SLIME_TEST_HANG_MARKER": str(marker)})
    ended = time.time()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    last = _last_line(proc.stderr)
    assert last.startswith(f"error: reward function --custom-rm-path {ROOT}/tests/_support/rewards.py:hangs has not "
                           "returned for sample "), last
    assert " after 2 s (--reward-timeout 2); " in last, last
    started = float(marker.read_text().split()[0])
    assert ended - started < 20, ended - started
    assert "rollout 0 |" not in proc.stdout
