"""benchmarks/multitask.py without training: the runs it builds (the real scripts up to train.py, whose
flags are parsed by the real parse_args), the metrics it reads, and the table on recorded numbers."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import multitask
from slime.utils.metrics import MetricsLogger, read_metrics

# Stands in for the venv's python: runs tools/ for real; for train.py, parses its flags with
# parse_args and prints what a run would train instead of training.
PARSE_ONLY = """\
import json, sys
from slime.utils.arguments import parse_args
args = parse_args(sys.argv[1:])
print("PARSED " + json.dumps({"tasks": [[t.name, t.prompt_data, t.rm_type, list(t.eval_prompt_data)] for t in args.tasks],
      "prompt_data": args.prompt_data, "eval": args.eval_prompt_data, "save": args.save,
      "num_rollout": args.num_rollout, "eval_interval": args.eval_interval, "lora_r": args.lora_r}))
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    (tmp_path / "parse_only.py").write_text(PARSE_ONLY)
    shim = tmp_path / "python"
    shim.write_text(f'#!/usr/bin/env bash\nif [ "$1" = train.py ]; then shift; '
                    f'exec {sys.executable} {tmp_path / "parse_only.py"} "$@"; fi\nexec {sys.executable} "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return shim


def _parsed(job: multitask.Job) -> dict:
    proc = subprocess.run(job.cmd, env={**os.environ, **job.env}, capture_output=True, text=True, timeout=300,
                          cwd=multitask.REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("PARSED ", 1)[1])


def test_the_three_runs_train_the_same_tasks_on_the_same_data(tmp_path: Path, fake_python: Path):
    work = tmp_path / "work"
    jobs = multitask.jobs(work, rollouts=5, python=str(fake_python))
    assert [j.name for j in jobs] == ["two-task", "solo add", "solo sub"]
    multi, add, sub = (_parsed(j) for j in jobs)
    data = {t: work / "two-task" / f"data-{t}" for t in ("add", "sub")}
    assert multi["tasks"] == [[t, str(data[t] / "train.jsonl"), "math", [t, str(data[t] / "eval.jsonl")]]
                              for t in ("add", "sub")]
    assert multi["prompt_data"] is None and multi["save"] == str(work / "two-task" / "lora")
    assert add["tasks"] == [] and add["prompt_data"] == str(work / "solo-add" / "data" / "train.jsonl")
    assert add["eval"] == ["arith", str(work / "solo-add" / "data" / "eval.jsonl")]
    assert sub["save"] == str(work / "solo-sub" / "lora-sub")
    for run in (multi, add, sub):  # same rollouts per task, eval only before training and after the last
        assert (run["num_rollout"], run["eval_interval"], run["lora_r"]) == (5, 5, 16)
    multitask.check_same_data(work)  # the scripts wrote byte-identical prompts for each task
    (work / "solo-sub" / "data" / "eval.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="other data"):
        multitask.check_same_data(work)


def _log(log_dir: Path, evals: dict[int, dict], peaks: list[float]) -> list[dict]:
    with MetricsLogger(log_dir) as logger:
        logger.log(-1, evals[-1])
        for step, peak in enumerate(peaks):
            logger.log(step, {"mem/peak_rss_gib": peak, **evals.get(step, {})})
    return read_metrics(log_dir / "metrics.jsonl")


def test_read_run_takes_first_and_last_eval_of_each_task_and_the_logged_peak(tmp_path: Path):
    two, add, _ = multitask.jobs(tmp_path, rollouts=3)
    rows = _log(tmp_path / "a", {-1: {"add/eval/add/reward_mean": 0.3, "sub/eval/sub/reward_mean": 0.1},
                                 2: {"add/eval/add/reward_mean": 0.8, "sub/eval/sub/reward_mean": 0.5}}, [2.0, 2.5, 2.4])
    run = multitask.read_run(two, 100.0, 3.0, rows)
    assert run == multitask.Run("two-task", 100.0, 3.0, 2.5, {"add": (0.3, 0.8), "sub": (0.1, 0.5)})
    rows = _log(tmp_path / "b", {-1: {"eval/arith/reward_mean": 0.3}, 2: {"eval/arith/reward_mean": 0.82}}, [2.0] * 3)
    assert multitask.read_run(add, 60.0, 2.5, rows).accuracy == {"add": (0.3, 0.82)}
    assert multitask.read_run(add, 60.0, 2.5, []).accuracy == {"add": (None, None)}  # a run without eval


MULTI = multitask.Run("two-task", 130.0, 3.0, 2.8, {"add": (0.30, 0.80), "sub": (0.10, 0.45)})
SOLOS = [multitask.Run("solo add", 100.0, 2.5, 2.4, {"add": (0.30, 0.82)}),
         multitask.Run("solo sub", 100.0, 2.5, 2.4, {"sub": (0.10, 0.55)})]


def test_table_compares_the_two_task_run_with_the_sum_of_the_solo_runs():
    rows = multitask.table_rows(MULTI, SOLOS)
    assert rows[0] == ["wall s (whole script)", "130", "100", "100", "200", "0.650", "<= 0.65x met"]
    assert rows[1] == ["peak RSS GiB (process tree, sampled)", "3.00", "2.50", "2.50", "5.00", "0.600",
                       "<= 0.60x met"]
    assert rows[2][1:] == ["2.80", "2.40", "2.40", "4.80", "0.583", "-"]
    by_what = {r[0]: r for r in rows}
    assert by_what["add: held-out accuracy before"] == ["add: held-out accuracy before", "0.30", "0.30", "-", "-",
                                                        "+0.00", "-"]
    assert by_what["add: held-out accuracy after"][1:] == ["0.80", "0.82", "-", "-", "-0.02", "abs <= 0.05 met"]
    assert by_what["sub: held-out accuracy after"][1:] == ["0.45", "-", "0.55", "-", "-0.10", "abs <= 0.05 MISSED"]


def test_a_missed_target_and_a_missing_figure():
    slow = multitask.Run("two-task", 150.0, 3.5, None, {"add": (None, None)})
    rows = multitask.table_rows(slow, SOLOS)
    assert rows[0][-2:] == ["0.750", "<= 0.65x MISSED"] and rows[1][-2:] == ["0.700", "<= 0.60x MISSED"]
    assert rows[2][1] == "-" and rows[2][-2] == "-"
    assert {r[0]: r for r in rows}["sub: held-out accuracy after"][1:] == ["-", "-", "0.55", "-", "-", "abs <= 0.05"]


def test_report_is_markdown_with_date_machine_command_and_every_row():
    text = multitask.report(MULTI, SOLOS, 28, ".venv/bin/python benchmarks/multitask.py", 330.0, "EPYC, 2 cores",
                            "2026-12-03T19:00:00+00:00")
    lines = text.splitlines()
    assert lines[0].startswith("# ") and "2026-12-03T19:00:00+00:00" in text and "EPYC, 2 cores" in text
    assert "`.venv/bin/python benchmarks/multitask.py` (330 s)" in text and "28 rollouts per task" in text
    table = [ln for ln in lines if ln.startswith("|")]
    assert table[0] == "|  | two-task run | solo add | solo sub | solo sum | two-task / sum (acc: minus solo) | target |"
    assert table[1] == "|---|---:|---:|---:|---:|---:|---|"
    assert table[2] == "| wall s (whole script) | 130 | 100 | 100 | 200 | 0.650 | <= 0.65x met |"
    assert len(table) == 2 + len(multitask.table_rows(MULTI, SOLOS))


def test_cli_defaults_and_quick():
    assert multitask.parse_cli([]).num_rollout == 28
    assert multitask.parse_cli(["--quick"]).num_rollout == multitask.QUICK_ROLLOUTS
    assert multitask.parse_cli(["--num-rollout", "7", "--out", "x.md"]).out == Path("x.md")
    with pytest.raises(SystemExit):
        multitask.parse_cli(["--num-rollout", "0"])
