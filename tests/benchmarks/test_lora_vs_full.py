"""benchmarks/lora_vs_full.py end to end on a short run: both children train the real 135M-shape model."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_short_run_prints_the_table_and_measures_both_variants(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/lora_vs_full.py"), "--batch", "2", "--seq", "16",
                           "--steps", "1", "--warmup", "0", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:6]] == ["full", "lora", "ratio", "full", "ratio"]
    assert lines[4].startswith("full mb2")
    result = json.loads(out.read_text())
    full, lora, reference = result["full"], result["lora"], result["full_at_lora_micro_batch"]
    # the defaults: full at micro-batch 1, LoRA at 2 recomputing its inputs, full again at 2 for reference
    assert (full["micro_batch"], lora["micro_batch"], reference["micro_batch"]) == (1, 2, 2)
    assert lora["recompute_input"] and not full["recompute_input"]
    assert reference["state_bytes"] == full["state_bytes"]
    # r = 16 on qkv (576 -> 960), proj (576 -> 576), fc1 (576 -> 3072), fc2 (1536 -> 576), 30 layers
    assert lora["trainable_params"] == 16 * ((576 + 960) + (576 + 576) + (576 + 3072) + (1536 + 576)) * 30
    assert full["trainable_params"] == 134_515_008  # tied embeddings counted once
    # full: params + grads + two Adam moments, fp32 (the 0-dim step counters are not counted)
    assert full["state_bytes"] == 4 * 4 * full["trainable_params"]
    # LoRA: the frozen base once, the adapters four times: no gradient or Adam state for a frozen weight
    assert lora["state_bytes"] == 4 * (full["trainable_params"] + 4 * lora["trainable_params"])
    assert lora["state_bytes"] / full["state_bytes"] < 0.30
    assert full["optimizer"] == lora["optimizer"] == "fused AdamW"
    assert "target state_bytes: lora/full = " in proc.stdout and "command: " in proc.stdout
    assert "at equal micro-batch 2: lora/full step " in proc.stdout
