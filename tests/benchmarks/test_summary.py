"""The pieces of ``make bench`` (benchmarks/summary.py) that compute and print, without running benchmarks."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from benchmarks.summary import markdown, tensor_bytes


def test_tensor_bytes_counts_every_tensor_of_every_file_by_dtype(tmp_path):
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)}, str(tmp_path / "one.safetensors"))
    save_file({"c": torch.zeros(2, 2, dtype=torch.int64)}, str(tmp_path / "two.safetensors"))
    (tmp_path / "notes.txt").write_text("not a tensor file")
    assert tensor_bytes(tmp_path) == 3 * 4 * 4 + 5 * 2 + 4 * 8


def test_the_table_has_a_row_per_ratio_and_says_why_one_is_missing():
    text = markdown([("LoRA / full: step time", 0.81234, "how"), ("vLLM rows", None, "no vLLM environment")],
                    "cmd --x", 12.3)
    lines = text.splitlines()
    assert lines[0] == "# Benchmarks: one table of ratios"
    assert "Command: `cmd --x` (12 s)" in lines[2] and "Date: " in lines[2] and "Machine: " in lines[2]
    assert "| LoRA / full: step time | 0.812 | how |" in lines
    assert "| vLLM rows | - | no vLLM environment |" in lines
