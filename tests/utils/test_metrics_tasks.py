"""Per-task metrics of a --lora-tasks run: the curves (one line per task), the terminal line and the summary."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from safetensors.torch import save_file

from slime.utils.arguments import parse_args
from slime.utils.metrics import (CURVES_FILE, LOSS_KEY, RESPONSE_LEN_KEY, REWARD_KEY, MetricsLogger, draw_curves,
                                 format_line, task_names)
from slime.utils.run_summary import summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVAL_EVERY = 2


def _task_metrics(step: int) -> dict:
    """One rollout of a two-task run (add learns faster than sub), shared metrics unprefixed."""
    metrics = {"perf/step_seconds": 10.0 + step, "mem/peak_rss_gib": 3.0, "sync/bytes": 1e6}
    for task, speed in (("add", 0.1), ("sub", 0.05)):
        metrics |= {f"{task}/{REWARD_KEY}": speed * step, f"{task}/{RESPONSE_LEN_KEY}": 20 - step,
                    f"{task}/{LOSS_KEY}": -0.01 * step, f"{task}/train/grad_norm": 1.0}
        if step % EVAL_EVERY == 0:
            metrics[f"{task}/eval/{task}/reward_mean"] = 2 * speed * step
    return metrics


def _history(steps: int = 5) -> list[tuple[int, dict]]:
    before = {"add/eval/add/reward_mean": 0.1, "sub/eval/sub/reward_mean": 0.05, "sub/eval/hard/reward_mean": 0.0}
    history = [(-1, before)] + [(step, _task_metrics(step)) for step in range(steps)]
    history[-1][1]["sub/eval/hard/reward_mean"] = 0.25
    return history


def _rows(history: list[tuple[int, dict]]) -> list[dict]:
    return [{"rollout_id": step, **metrics} for step, metrics in history]


def _labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def test_task_names_come_from_prefixed_keys_only():
    rows = _rows(_history())
    assert task_names(rows) == ["add", "sub"]
    # a one-task run: groups and eval sets are no tasks, even an eval set named like a group
    assert task_names([{REWARD_KEY: 1.0, "eval/arith/reward_mean": 0.5, "eval/rollout/reward_mean": 0.1,
                        "perf/step_seconds": 1.0, "mem/peak_rss_gib": 2.0}]) == []


def test_curves_draw_one_line_per_task_in_each_panel_and_its_eval_markers():
    fig = draw_curves(_rows(_history()), "two tasks")
    reward, length, loss, kl = fig.axes
    assert _labels(reward) == ["add", "sub", "eval: add", "eval: sub hard", "eval: sub"]
    assert [t.get_text() for t in reward.get_legend().get_texts()] == _labels(reward)
    add_line, sub_line, add_eval, _, sub_eval = reward.get_lines()
    assert list(add_line.get_xdata()) == [0, 1, 2, 3, 4]
    assert list(sub_line.get_ydata()) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    # each task's eval markers: the pre-training eval (step -1) and every EVAL_EVERY rollouts, in its line's colour
    assert list(add_eval.get_xdata()) == [-1, 0, 2, 4] and add_eval.get_color() == add_line.get_color()
    assert sub_eval.get_color() == sub_line.get_color() != add_line.get_color()
    assert sub_eval.get_marker() != reward.get_lines()[3].get_marker()  # sub's two eval sets: one colour, two markers
    assert _labels(length) == _labels(loss) == ["add", "sub"]
    assert _labels(kl) == [] and kl.texts[0].get_text() == "KL not used"


def test_a_run_without_tasks_draws_one_unlabelled_line_as_before():
    rows = [{"rollout_id": s, REWARD_KEY: 0.1 * s, LOSS_KEY: -0.1, "eval/arith/reward_mean": 0.3} for s in range(3)]
    reward, length, loss, _ = draw_curves(rows).axes
    assert _labels(reward) == ["rollout", "eval: arith"]
    assert _labels(loss) == ["train"] and loss.get_legend() is None
    assert length.texts[0].get_text() == "no data yet"


def test_the_logger_writes_per_task_curves_png(tmp_path: Path):
    with MetricsLogger(tmp_path) as logger:
        for step, metrics in _history():
            logger.log(step, metrics)
    png = tmp_path / CURVES_FILE
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert imread(png).shape[:2] == (750, 1100)


def test_format_line_shows_each_tasks_reward_and_eval():
    line = format_line(4, _history()[-1][1])
    assert line == ("rollout 4 | add reward 0.4 | add eval 0.8 | sub reward 0.2 | sub eval hard 0.25 | sub eval 0.4"
                    " | mem 3 GiB | 14.0 s")


def _tasks_args(tmp_path: Path, save: Path | None) -> argparse.Namespace:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("- {name: add, prompt_data: add.jsonl, rm_type: math, eval_prompt_data: add_eval.jsonl}\n"
                     "- {name: sub, prompt_data: sub.jsonl, rm_type: math,"
                     " eval_prompt_data: {sub: sub_eval.jsonl, hard: hard.jsonl}}\n")
    return parse_args(["--use-lora", "--lora-tasks", str(tasks), *(["--save", str(save)] if save else [])])


def test_summary_lists_every_task_with_accuracy_before_after_and_adapter(tmp_path: Path):
    save = tmp_path / "ckpt"
    adapter = save / "add" / "adapter"
    adapter.mkdir(parents=True)
    save_file({"w": torch.zeros(512, 1024)}, str(adapter / "adapter_model.safetensors"))  # 2 MiB of tensor
    (adapter / "adapter_config.json").write_text("{}")
    size_mib = sum(f.stat().st_size for f in adapter.iterdir()) / 2**20
    args = _tasks_args(tmp_path, save)
    assert [t.name for t in args.tasks] == ["add", "sub"]
    lines = summarize(args, _history(), 123.4, {"peak_rss_bytes": 3 * 2**30})
    assert lines[0] == "wall time 123 s"
    assert lines[1] == "seconds per rollout step: median 12.0 over 5 steps"
    assert lines[3:] == [
        "task add:",
        "  add/eval/add/reward_mean: 0.100 -> 0.800 (after rollout 4)",
        f"  adapter: {adapter.absolute()} ({size_mib:.1f} MiB)",
        "task sub:",
        "  sub/eval/hard/reward_mean: 0.000 -> 0.250 (after rollout 4)",
        "  sub/eval/sub/reward_mean: 0.050 -> 0.400 (after rollout 4)",
        f"  adapter: {(save / 'sub' / 'adapter').absolute()} (not written)",
    ]
    assert f"{size_mib:.1f}" == "2.0"


def test_summary_without_save_or_eval_still_names_the_tasks(tmp_path: Path):
    args = _tasks_args(tmp_path, None)
    history = [(0, {"add/rollout/reward_mean": 0.5, "sub/rollout/reward_mean": 0.5})]
    assert summarize(args, history, 5.0, {})[1:] == ["task add:", "task sub:"]


def test_summary_of_a_one_task_run_names_the_one_adapter(tmp_path: Path):
    save = tmp_path / "ckpt"
    (save / "adapter").mkdir(parents=True)
    (save / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 2**20)
    args = parse_args(["--use-lora", "--save", str(save)])
    assert args.tasks == []
    history = [(-1, {"eval/arith/reward_mean": 0.25}), (0, {"perf/step_seconds": 9.0}),
               (1, {"perf/step_seconds": 11.0, "eval/arith/reward_mean": 0.5})]
    assert summarize(args, history, 30.0, {}) == [
        "wall time 30 s", "eval/arith/reward_mean: 0.250 -> 0.500 (after rollout 1)",
        "seconds per rollout step: median 11.0 over 2 steps", f"adapter: {(save / 'adapter').absolute()} (1.0 MiB)"]
