"""The main job, shortened: `make demo`'s script on the real SmolLM2 model; held-out accuracy must rise."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_script_learns(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OUT": str(tmp_path), "NUM_ROLLOUT": "21", "EVAL_INTERVAL": "21"}
    proc = subprocess.run(["bash", str(ROOT / "examples/lora/run-smollm2-135m-lora.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/arith/reward_mean"] for r in rows if "eval/arith/reward_mean" in r]
    assert len(evals) == 2 and evals[-1] >= evals[0] + 0.1, evals  # 100 held-out prompts, before and after; after 7 rollouts CI saw only +0.04
    assert (tmp_path / "curves.png").stat().st_size > 0
    adapter = tmp_path / "lora-add" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert "Summary" in proc.stdout and "eval/arith/reward_mean: " in proc.stdout
