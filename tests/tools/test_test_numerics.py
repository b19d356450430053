"""tools/test_numerics.py: recorded parity errors become one row per assertion, worst setting wins."""

import json

import pytest
import torch

from tests._support.numerics import UNIT_ROUNDOFF_FP32, assert_close, fp32_tolerance
from tools.test_numerics import format_table, worst_per_assertion


def test_recorded_errors_are_tabulated_with_their_margin(tmp_path, monkeypatch):
    logs = {"native": tmp_path / "native.jsonl", "avx2": tmp_path / "avx2.jsonl"}
    expected = torch.tensor([1.0, -2.0, 4.0])
    for setting, error in (("native", 1e-7), ("avx2", 4e-7)):
        monkeypatch.setenv("SLIME_NUMERICS_LOG", str(logs[setting]))
        assert_close(expected + torch.tensor([0.0, error, 0.0], dtype=torch.float64), expected, atol=1e-6, rtol=0,
                     what="toy")
        assert_close(expected, expected, atol=1e-6, rtol=0, what="exact")
    with pytest.raises(AssertionError, match="too far"):
        assert_close([1.0], [1.1], atol=1e-3, rtol=0, what="too far")  # recorded, then it fails

    table = worst_per_assertion(logs)
    row = next(row for (test, what), row in table.items() if what == "toy")
    assert row["native"][0] == pytest.approx(1e-7) and row["avx2"][0] == pytest.approx(4e-7)
    lines = format_table(table, ["native", "avx2"])
    toy = next(line for line in lines if "| toy |" in line)
    assert toy.endswith("| 2.5x (< 10x) |")  # 1e-6 allowed / 4e-7 seen in the worst setting
    assert next(line for line in lines if "| exact |" in line).endswith("| infx |")
    assert lines[-1] == "3 assertions, 2 with a margin under 10x"
    assert json.loads(logs["avx2"].read_text().splitlines()[0])["test"].endswith(
        "test_recorded_errors_are_tabulated_with_their_margin")


def test_fp32_tolerance_is_linear_in_scale_depth_and_root_width():
    assert fp32_tolerance(1.0, 1, 1) == 16 * UNIT_ROUNDOFF_FP32
    assert fp32_tolerance(3.0, 2, 16) == pytest.approx(3 * 2 * 4 * fp32_tolerance(1.0, 1, 1))
    assert fp32_tolerance(1.0, 1, 1, log_softmax=True) == 2 * fp32_tolerance(1.0, 1, 1)
