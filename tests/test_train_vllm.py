"""train.py with ``--rollout-engine vllm`` on the real SmolLM2-135M: the real CLI, Ray, megatron-core
and a vLLM server per run.  Skipped where no vLLM environment exists (``make setup-vllm``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slime.rollout.vllm_server import find_vllm_python, group_members, vllm_python_error

ROOT = Path(__file__).resolve().parents[1]
VLLM_MISSING = vllm_python_error(find_vllm_python(None))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(VLLM_MISSING is not None, reason=f"no vLLM environment: {VLLM_MISSING}")]
READY = re.compile(r"vLLM ready at (\S+) in \d+ s \(pid (\d+),")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from slime.utils.model_prep import prepare_model

    root = tmp_path_factory.mktemp("arith")
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_arith_data.py"), "--out-dir", str(root), "--op", "add",
                    "--seed", "0", "--n-train", "200", "--n-eval", "16"], check=True, capture_output=True)
    return str(prepare_model("smollm2-135m-instruct")), root


def argv(setup, out: Path, *flags, engine: str = "vllm") -> list[str]:
    model, data = setup
    return [sys.executable, str(ROOT / "train.py"), "--hf-checkpoint", model, "--rollout-engine", engine,
            "--use-lora", "--lora-r", "12", "--lora-alpha", "32", "--prompt-data", str(data / "train.jsonl"),
            "--apply-chat-template", "--rm-type", "math", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
            "--rollout-max-response-len", "32", "--advantage-estimator", "grpo", "--lr", "1e-4", "--seed", "1234",
            "--max-tokens-per-micro-batch", "256", "--vllm-max-model-len", "256", "--vllm-kv-cache-gib", "1",
            "--log-dir", str(out / "logs"), *map(str, flags)]


def rows(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def server_pid(stdout: str) -> int:
    found = READY.findall(stdout)
    assert len(found) == 1, stdout[-3000:]
    return int(found[0][1])


def test_rollouts_on_vllm_sync_versions_and_a_killed_server_ends_the_run_resumably(setup, tmp_path):
    """One run, three rollouts, then vLLM's API server is SIGKILLed (after the third checkpoint):

    * every step's adapter reached vLLM under a new version and the old one was unloaded; the
      log-prob gap stayed under --check-logprob-gap's fp32 default at every step; the policy got
      gradient signal;
    * the kill ends the run within the bounded wait: exit status 3, one stderr line naming the vLLM
      server, the newest checkpoint and the --load command, no traceback, no vLLM process left;
    * the checkpoint resumes (with the built-in engine) at the next rollout."""
    import psutil

    save, logs = tmp_path / "save", tmp_path / "logs"
    command = argv(setup, tmp_path, "--num-rollout", 200, "--save", save, "--save-interval", 1)
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, start_new_session=True,
                                env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        deadline = time.time() + 1800
        while proc.poll() is None and not (save / "iter_0000002").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        launcher = server_pid((tmp_path / "stdout").read_text())
        server = next(p for p in psutil.Process(launcher).children() if "vllm.entrypoints.openai" in " ".join(p.cmdline()))
        server.kill()  # the API server (the launcher's other child is its reaper); the launcher takes the rest down
        killed_at = time.time()
        proc.wait(timeout=300)
        ended_after = time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert "--lora-r 12 is served with --max-lora-rank 16" in stdout
    metrics = [r for r in rows(logs) if r["rollout_id"] in (0, 1, 2)]
    assert [r["sync/adapter_version"] for r in metrics] == [2, 3, 4]  # v1: the sync before rollout 0
    for r in metrics:
        assert r["train/rollout_logprob_abs_diff"] < 1e-3, r
        assert r["sync/bytes"] > 0 and r["train/grad_norm"] > 0, r
    assert min(r["rollout/zero_std_groups"] for r in metrics) < 1  # some group had rewards to learn from
    log = next(logs.glob("vllm-engine-*.log")).read_text()
    for version in (1, 2, 3, 4):
        assert f"Loaded new LoRA adapter: name 'policy-v{version}'" in log
    for version in (1, 2, 3):
        assert f"Removed LoRA adapter: name 'policy-v{version}'" in log

    assert proc.returncode == 3, stderr[-3000:]
    assert ended_after < 120, ended_after
    assert "Traceback" not in stderr, stderr[-5000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: the vLLM server (pid ") and "exited with status" in last, last
    assert "; newest checkpoint: " in last and "; resume with: " in last and last.count("--load") == 1, last
    assert group_members(launcher) == []

    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert iteration >= 2
    resumed = subprocess.run(argv(setup, tmp_path / "resumed", "--num-rollout", iteration + 2, "--load", save,
                                  engine="hf"), cwd=ROOT, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [r["rollout_id"] for r in rows(tmp_path / "resumed" / "logs")] == [iteration + 1]
