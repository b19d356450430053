"""The guide's "run the tests" step: `python slime_plugins/lora/test_lora.py` passes from the root and its folder."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("cwd", [ROOT, ROOT / "slime_plugins" / "lora"])
def test_self_check_passes(cwd):
    script = ROOT / "slime_plugins" / "lora" / "test_lora.py"
    proc = subprocess.run([sys.executable, str(script.relative_to(cwd) if cwd == ROOT else "test_lora.py")],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LoRA applied successfully!" in proc.stdout
    assert "Trainable parameters:" in proc.stdout
    assert "All LoRA checks passed" in proc.stdout
    assert "FAIL" not in proc.stdout
