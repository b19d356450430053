"""serve_adapters.py on the real SmolLM2: one mixed batch, answers routed per adapter name.

An adapter whose B is zero (peft's default init) changes nothing, so its accuracy row must equal
the base model's on every task, while sharing the batch with requests for the other adapter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _adapter(base: Path, out: Path, init: bool) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.mark.slow
def test_zero_adapter_row_equals_base_row(tmp_path):
    from slime.utils.model_prep import prepare_model

    base = prepare_model("smollm2-135m-instruct")
    tasks = {}
    for op in ("add", "sub"):
        subprocess.run([sys.executable, str(ROOT / "tools/make_arith_data.py"), "--out-dir", str(tmp_path / op),
                        "--op", op, "--seed", "0", "--n-train", "1", "--n-eval", "12"], check=True,
                       capture_output=True)
        tasks[op] = tmp_path / op / "eval.jsonl"
    zero = _adapter(base, tmp_path / "zero", init=True)
    noisy = _adapter(base, tmp_path / "noisy", init=False)
    cmd = [sys.executable, str(ROOT / "examples/lora/serve_adapters.py"), "--hf-checkpoint", str(base),
           "--adapter", f"zero={zero}", "--adapter", f"noisy={noisy}", "--max-new-tokens", "12",
           *[a for op, path in tasks.items() for a in ("--task", f"{op}={path}")]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]]
            for line in proc.stdout.splitlines() if "|" in line}
    assert rows["greedy accuracy"] == ["task add", "task sub"]
    assert set(rows) == {"greedy accuracy", "base", "zero", "noisy"}
    assert rows["zero"] == rows["base"]
    assert all(0.0 <= float(c) <= 1.0 for c in rows["noisy"])


def test_bad_adapter_path_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples/lora/serve_adapters.py"), "--hf-checkpoint",
                           str(tmp_path), "--adapter", f"x={tmp_path / 'missing'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --adapter x=")
    assert "Traceback" not in proc.stderr
