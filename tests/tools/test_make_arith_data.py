"""tools/make_arith_data.py: format, determinism, independent streams, CLI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools/make_arith_data.py"


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_arith_data", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(out_dir: Path, *flags: str) -> None:
    tool.main(["--out-dir", str(out_dir), *flags])


def test_add_lines_are_well_formed(tmp_path: Path) -> None:
    _run(tmp_path, "--n-train", "300", "--n-eval", "20")
    train, evals = _read(tmp_path / "train.jsonl"), _read(tmp_path / "eval.jsonl")
    assert (len(train), len(evals)) == (300, 20)
    for row in train + evals:
        a, b = row["metadata"]["a"], row["metadata"]["b"]
        assert 0 <= a <= 20 and 0 <= b <= 20
        assert row["metadata"]["op"] == "add"
        assert row["prompt"] == [
            {"role": "user", "content": f"What is {a} + {b}? Answer with just the number."}
        ]
        assert row["label"] == str(a + b)
    # Uniform over 0..20: 300 draws hit both ends of the range.
    operands = {row["metadata"]["a"] for row in train}
    assert min(operands) == 0 and max(operands) == 20


def test_sub_uses_minus_and_difference(tmp_path: Path) -> None:
    _run(tmp_path, "--op", "sub", "--n-train", "50", "--n-eval", "5")
    rows = _read(tmp_path / "train.jsonl")
    assert any(int(r["label"]) < 0 for r in rows)
    for row in rows:
        a, b = row["metadata"]["a"], row["metadata"]["b"]
        assert row["prompt"][0]["content"] == f"What is {a} - {b}? Answer with just the number."
        assert row["label"] == str(a - b) and row["metadata"]["op"] == "sub"


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        _run(tmp_path / name, "--seed", seed, "--n-train", "40", "--n-eval", "10")
    for split in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()
        assert (tmp_path / "a" / split).read_bytes() != (tmp_path / "c" / split).read_bytes()


def test_eval_stream_is_independent_of_train(tmp_path: Path) -> None:
    _run(tmp_path / "small", "--n-train", "10", "--n-eval", "30")
    _run(tmp_path / "big", "--n-train", "500", "--n-eval", "30")
    small_eval = (tmp_path / "small/eval.jsonl").read_bytes()
    assert small_eval == (tmp_path / "big/eval.jsonl").read_bytes()
    # ... and eval is not simply a copy of the train prefix.
    train_prefix = _read(tmp_path / "big/train.jsonl")[:30]
    assert _read(tmp_path / "small/eval.jsonl") != train_prefix


def test_defaults_and_no_temp_files_left(tmp_path: Path) -> None:
    _run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl", "train.jsonl"]
    assert len(_read(tmp_path / "train.jsonl")) == 2000
    assert len(_read(tmp_path / "eval.jsonl")) == 100


def test_cli_rejects_bad_flags(tmp_path: Path) -> None:
    base = [sys.executable, str(TOOL), "--out-dir", str(tmp_path)]
    bad_op = subprocess.run([*base, "--op", "mul"], capture_output=True, text=True)
    assert bad_op.returncode == 2 and "--op" in bad_op.stderr
    negative = subprocess.run([*base, "--n-train", "-1"], capture_output=True, text=True)
    assert negative.returncode == 2 and "must be >= 0" in negative.stderr
    assert not (tmp_path / "train.jsonl").exists()


@pytest.mark.parametrize("op", ["add", "sub"])
def test_cli_end_to_end(tmp_path: Path, op: str) -> None:
    cmd = [sys.executable, str(TOOL), "--out-dir", str(tmp_path), "--op", op, "--n-train", "5", "--n-eval", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert f"wrote 5 {op} problems" in result.stdout
    assert len(_read(tmp_path / "eval.jsonl")) == 2
