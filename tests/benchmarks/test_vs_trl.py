"""benchmarks/vs_trl.py: scoring, metrics parsing, process-tree memory sampling, the report,
and the TRL child end to end on a tiny model (TRL installed: the ``bench`` extra)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks import vs_trl
from slime.utils.errors import UserError  # noqa: E402
from slime.utils.metrics import MetricsLogger, read_metrics  # noqa: E402


def test_score_uses_the_final_number():
    assert vs_trl.score("7 + 12 = 19", "19") == 1.0
    assert vs_trl.score("19. Or maybe 20", "19") == 0.0
    assert vs_trl.score("I cannot say", "19") == 0.0
    assert vs_trl.score("The answer is 19.0", "19") == 1.0


def test_reward_reads_conversational_and_plain_completions():
    conversational = [[{"role": "assistant", "content": "It is 5"}], [{"role": "assistant", "content": "6"}]]
    assert vs_trl.arith_reward(prompts=[None, None], completions=conversational, label=["5", "5"]) == [1.0, 0.0]
    assert vs_trl.arith_reward(prompts=[None], completions=["5"], label=["5"], trainer_state=None) == [1.0]


def _log_run(log_dir: Path) -> list[dict]:
    """A run as train.py logs it: the evaluation before training, then 3 steps, evaluating at 1 and 2."""
    logger = MetricsLogger(log_dir)
    logger.log(-1, {"eval/arith/reward_mean": 0.4, "perf/eval_arith_seconds": 9.0})
    for step, (seconds, reward) in enumerate([(10.0, 0.5), (12.0, 0.6), (11.0, 0.7)]):
        metrics = {"perf/step_seconds": seconds, "rollout/reward_mean": reward, "mem/peak_rss_gib": 2.0 + step}
        if step >= 1:
            metrics |= {"eval/arith/reward_mean": 0.6 + 0.1 * step, "perf/eval_arith_seconds": 3.0}
        logger.log(step, metrics)
    logger.close()
    return read_metrics(log_dir / "metrics.jsonl")


def test_ours_from_metrics_excludes_evaluation_time(tmp_path):
    result = vs_trl.ours_from_metrics(_log_run(tmp_path))
    assert result.step_seconds == [10.0, 9.0, 8.0]
    assert result.median_step_s == 9.0
    assert (result.accuracy_before, result.accuracy_after) == (0.4, pytest.approx(0.8))
    assert result.train_seconds == 27.0
    assert result.seconds_to_target == 19.0  # step 1's evaluation (0.7) is the first >= 0.69
    assert result.own_peak_rss_gib == 4.0
    assert result.train_reward == [0.5, 0.6, 0.7]
    assert result.eval_seconds == 15.0


def test_ours_from_metrics_needs_both_evaluations(tmp_path):
    rows = [r for r in _log_run(tmp_path) if r["rollout_id"] != -1]
    with pytest.raises(UserError, match="--eval-interval"):
        vs_trl.ours_from_metrics(rows)


def test_sampler_counts_grandchildren(tmp_path):
    # The child starts a grandchild that holds 300 MB; only the grandchild's RSS can make the peak that large.
    grandchild = "b = bytearray(300 * 2**20); import time; time.sleep(3)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    wall, peak_gib = vs_trl.run_measured([sys.executable, "-c", child], tmp_path / "log.txt")
    assert peak_gib * 2**30 > 300 * 2**20
    assert wall >= 3.0


def test_run_measured_reports_a_failing_child(tmp_path):
    with pytest.raises(SystemExit, match="exit status 3"):
        vs_trl.run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log.txt")


def _result(system: str, step: float, mem: float, to_target: float | None) -> "vs_trl.RunResult":
    return vs_trl.RunResult(system=system, step_seconds=[step, step + 1, step - 1], accuracy_before=0.4,
                            accuracy_after=0.7, train_seconds=3 * step, seconds_to_target=to_target,
                            peak_rss_gib=mem)


def test_report_ratios_and_targets():
    rows = {r[0]: r for r in vs_trl.report_rows(_result("trl", 20.0, 10.0, 600.0), _result("ours", 8.0, 5.0, 300.0))}
    assert rows["median s/step"][1:4] == ("20.00", "8.00", "0.400")
    assert rows["median s/step"][4].endswith(" met")
    assert rows["peak RSS GiB (tree, sampled)"][3:] == ("0.500", "<= 0.40x MISSED")
    assert rows["train s to acc >= 0.69"][4] == "<= 390 s met"


def test_report_with_one_system_has_no_ratios():
    text = vs_trl.format_report(_result("trl", 20.0, 10.0, None), None, "vs_trl.py --only trl")
    median = next(line for line in text.splitlines() if line.startswith("median s/step")).split()
    assert median[2:5] == ["20.00", "-", "-"]
    assert "command: vs_trl.py --only trl" in text and "machine: " in text


def test_trl_child_trains_a_tiny_model(tmp_path):
    """Two real GRPOTrainer steps on a tiny random model with the char tokenizer."""
    pytest.importorskip("trl")
    from tests._support.tiny_rl import make_tiny_rl_checkpoint, write_prompts

    model = make_tiny_rl_checkpoint(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    write_prompts(data / "train.jsonl", n=64, seed=0)
    write_prompts(data / "eval.jsonl", n=6, seed=1)
    result = vs_trl.run_trl(model, data, tmp_path / "trl", steps=2)
    assert len(result.step_seconds) == 2 and all(s > 0 for s in result.step_seconds)
    assert len(result.train_reward) == 2
    assert 0.0 <= result.accuracy_before <= 1.0 and 0.0 <= result.accuracy_after <= 1.0
    assert result.config["per_device_train_batch_size"] == 32 and result.config["steps_per_generation"] == 1
    assert result.peak_rss_gib > 0.1 and result.wall_seconds >= result.train_seconds + result.eval_seconds
