"""The few lines a run ends with: accuracy before -> after, time, memory, where the adapter is."""

from __future__ import annotations

import argparse
from pathlib import Path


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def summarize(args: argparse.Namespace, history: list[tuple[int, dict]], wall_seconds: float,
              memory_summary: dict) -> list[str]:
    """Human-readable summary lines from the logged (rollout_id, metrics) history."""
    lines = [f"wall time {wall_seconds:.0f} s"]
    for key in sorted({k for _, m in history for k in m if k.startswith("eval/") and k.endswith("/reward_mean")}):
        series = [(step, m[key]) for step, m in history if key in m]
        (_, first), (last_step, last) = series[0], series[-1]
        lines.append(f"{key}: {first:.3f} -> {last:.3f} (after rollout {last_step})")
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
    if args.save:
        adapter = Path(args.save) / ("adapter" if args.use_lora else "model")
        if adapter.exists():
            kind = "adapter" if args.use_lora else "full weights"
            lines.append(f"{kind}: {adapter.absolute()} ({_dir_bytes(adapter.resolve()) / 2**20:.1f} MiB)")
    return lines
