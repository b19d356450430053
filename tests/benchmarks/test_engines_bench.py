"""benchmarks/engines.py: the metrics parsing and the table, on tiny inputs (no engine is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import engines
from slime.utils.metrics import MetricsLogger, read_metrics


def _log_demo_run(log_dir: Path) -> list[dict]:
    """A demo run as train.py logs it: eval before training, 3 rollouts, eval again inside the last."""
    logger = MetricsLogger(log_dir)
    logger.log(-1, {"eval/arith/reward_mean": 0.4, "perf/eval_arith_seconds": 9.0})
    for step, (seconds, rollout, train, rss) in enumerate([(10.0, 5.0, 4.0, 3.0), (12.0, 6.0, 5.0, 3.5),
                                                            (20.0, 5.5, 4.5, 3.2)]):
        metrics = {"perf/step_seconds": seconds, "perf/rollout_seconds": rollout, "perf/train_seconds": train,
                   "mem/peak_rss_gib": rss}
        if step == 2:
            metrics |= {"eval/arith/reward_mean": 0.5, "perf/eval_arith_seconds": 9.5}
        logger.log(step, metrics)
    logger.close()
    return read_metrics(log_dir / "metrics.jsonl")


def test_rl_summary_takes_medians_over_rollouts_and_eval_out_of_the_step(tmp_path):
    summary = engines.rl_summary(_log_demo_run(tmp_path))
    # steps 10, 12 and 20 - 9.5 (the eval inside the last rollout): median 10.5; the eval before training is no step
    assert summary == {"step_seconds": 10.5, "rollout_seconds": 5.5, "train_seconds": 4.5, "peak_rss_gib": 3.5,
                       "rollouts": 3}


def test_rl_summary_refuses_a_run_without_rollouts(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(-1, {"eval/arith/reward_mean": 0.4})
    logger.close()
    with pytest.raises(SystemExit, match="no rollout"):
        engines.rl_summary(read_metrics(tmp_path / "metrics.jsonl"))


def test_table_rows_have_the_ratio_and_skip_what_was_not_measured():
    results = {"hf": {"throughput": {"start_seconds": 2.0, "base_tokens_per_s": 200.0, "lora_tokens_per_s": 100.0,
                                     "adapter_load_seconds": 0.2, "peak_rss_gib": 1.0}},
               "vllm": {"throughput": {"start_seconds": 100.0, "base_tokens_per_s": 150.0, "lora_tokens_per_s": 75.0,
                                       "adapter_load_seconds": 0.5, "peak_rss_gib": 4.0}}}
    rows = engines.table_rows(results)
    assert [r[0] for r in rows] == [label for label, part, _, _ in engines.ROWS if part == "throughput"]
    assert rows[0] == ["engine start-up s", "2.0", "100.0", "50.00"]
    assert rows[1] == ["tokens/s, base model", "200.0", "150.0", "0.75"]
    # one engine only (--engines hf): the other column and the ratio show as "-"
    only_hf = engines.table_rows({"hf": {"rl": {"step_seconds": 10.0, "rollout_seconds": 5.0}}})
    assert only_hf == [["RL step s (median, eval excluded)", "10.0", "-", "-"],
                       ["RL rollout s (median)", "5.0", "-", "-"]]


def test_report_is_a_markdown_table_with_date_machine_and_command():
    rows = engines.table_rows({"hf": {"rl": {"train_seconds": 4.0}}, "vllm": {"rl": {"train_seconds": 5.0}}})
    text = engines.report(rows, ".venv/bin/python benchmarks/engines.py --skip-rl", 12.3, "AMD EPYC, 2 cores",
                          "2026-12-03T16:00:00+00:00")
    lines = text.splitlines()
    assert lines[0].startswith("# ")
    assert "2026-12-03T16:00:00+00:00" in text and "AMD EPYC, 2 cores" in text
    assert "`.venv/bin/python benchmarks/engines.py --skip-rl` (12 s)" in text
    table = [ln for ln in lines if ln.startswith("|")]
    assert table[0] == "|  | built-in (hf) | vLLM | vLLM / built-in |"
    assert table[1] == "|---|---:|---:|---:|"
    assert table[2] == "| RL train s (median) | 4.0 | 5.0 | 1.25 |"


def test_prompts_are_eight_distinct_groups_of_four():
    assert len(set(engines.PAIRS)) == 8 and engines.SAMPLES == 4
