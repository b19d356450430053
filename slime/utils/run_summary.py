"""The few lines a run ends with: accuracy before -> after, time, memory, where the adapter(s) are."""

from __future__ import annotations

import argparse
from pathlib import Path


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _before_after(history: list[tuple[int, dict]], key: str) -> str | None:
    """``first -> last (after rollout N)`` of ``key``'s logged values; None if it was never logged."""
    series = [(step, m[key]) for step, m in history if m.get(key) is not None]
    if not series:
        return None
    (_, first), (last_step, last) = series[0], series[-1]
    return f"{first:.3f} -> {last:.3f} (after rollout {last_step})"


def _eval_keys(history: list[tuple[int, dict]], prefix: str = "") -> list[str]:
    """The ``<prefix>eval/<set>/reward_mean`` keys of the history, sorted."""
    return sorted({k for _, m in history for k in m if k.startswith(prefix + "eval/") and k.endswith("/reward_mean")})


def _adapter_line(kind: str, path: Path) -> str | None:
    if not path.exists():
        return None
    return f"{kind}: {path.absolute()} ({_dir_bytes(path.resolve()) / 2**20:.1f} MiB)"


def task_lines(args: argparse.Namespace, history: list[tuple[int, dict]]) -> list[str]:
    """Per task of a ``--lora-tasks`` run: held-out accuracy before -> after (each eval set, from the
    task's ``<task>/eval/<set>/reward_mean``) and its adapter ``<save>/<task>/adapter`` with its size."""
    lines = []
    for task in getattr(args, "tasks", None) or []:
        name = task.name
        lines.append(f"task {name}:")
        for key in _eval_keys(history, f"{name}/"):
            lines.append(f"  {key}: {_before_after(history, key)}")
        if args.save:
            adapter = Path(args.save) / name / "adapter"
            lines.append("  " + (_adapter_line("adapter", adapter) or f"adapter: {adapter.absolute()} (not written)"))
    return lines


def summarize(args: argparse.Namespace, history: list[tuple[int, dict]], wall_seconds: float,
              memory_summary: dict) -> list[str]:
    """Human-readable summary lines from the logged (rollout_id, metrics) history."""
    lines = [f"wall time {wall_seconds:.0f} s"]
    for key in _eval_keys(history):
        lines.append(f"{key}: {_before_after(history, key)}")
    train_seconds = [m["perf/step_seconds"] for _, m in history if "perf/step_seconds" in m]
    if train_seconds:
        ordered = sorted(train_seconds)
        lines.append(f"seconds per rollout step: median {ordered[len(ordered) // 2]:.1f} over {len(ordered)} steps")
    peak, peak_pss = memory_summary.get("peak_rss_bytes"), memory_summary.get("peak_pss_bytes")
    if peak:
        # PSS splits shared library pages between the processes mapping them (the run's real
        # footprint); the RSS sum counts them once per process (an upper bound).
        pss = f"PSS sum {peak_pss / 2**30:.2f} GiB, " if peak_pss else ""
        lines.append(f"peak memory of all processes (sampled): {pss}RSS sum {peak / 2**30:.2f} GiB")
    if getattr(args, "tasks", None):
        return lines + task_lines(args, history)
    if args.save:
        kind = "adapter" if args.use_lora else "full weights"
        line = _adapter_line(kind, Path(args.save) / ("adapter" if args.use_lora else "model"))
        lines += [line] if line else []
    return lines
