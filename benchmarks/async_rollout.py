"""Rollouts overlapped with training (``--async-rollout``) against the synchronous loop, on the demo.

Two runs of ``examples/lora/run-smollm2-135m-lora.sh`` (SmolLM2-135M-Instruct, LoRA r 16, 16
samples per rollout), one after the other, the second with ``--async-rollout``; ``NUM_ROLLOUT=N``,
no eval between rollouts.  From each run's ``metrics.jsonl``, per rollout after the first (start-up
and the first rollout are the same in both):

* ``perf/step_seconds``: what one RL step costs on this machine;
* ``perf/rollout_seconds`` (the rollout's generation, from submission to scored),
  ``perf/train_seconds``, ``sync/seconds``, and ``perf/rollout_wait_seconds``: how long the
  trainer's loop waited for the rollout after the previous step ended.

Projection for a machine where the engine and the trainer have their own devices (GPU pools, or
separate nodes): a synchronous step costs ``R + T + S`` (rollout, train, sync); overlapped, the
engine's rollout ``N + 1`` runs during the trainer's ``T + S``, so a step costs
``max(R, T + S)``.  The projection uses the synchronous run's own phase medians, each measured
while it had the machine to itself.

Run:  ``.venv/bin/python benchmarks/async_rollout.py [--num-rollout 8] [--out docs/async-bench.md]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

from benchmarks.vs_trl import machine_line, run_measured  # noqa: E402
from slime.utils.atomic import write_text_atomically  # noqa: E402
from slime.utils.metrics import METRICS_FILE, read_metrics  # noqa: E402

DEMO = REPO / "examples" / "lora" / "run-smollm2-135m-lora.sh"
PHASES = ("perf/step_seconds", "perf/rollout_seconds", "perf/train_seconds", "sync/seconds",
          "perf/rollout_wait_seconds")


def run_demo(out: Path, num_rollout: int, extra: list[str]) -> dict[str, float]:
    """One demo run; the median of each phase over rollouts 1.. (rollout 0 has no overlap)."""
    env = {**os.environ, "OUT": str(out), "NUM_ROLLOUT": str(num_rollout), "EVAL_INTERVAL": str(10 * num_rollout),
           "RAY_AUTH_MODE": "disabled"}
    wall, _ = run_measured(["bash", str(DEMO), *extra], out / "run.log", env=env)
    rows = [r for r in read_metrics(out / METRICS_FILE) if r.get("rollout_id", -1) >= 1]
    medians = {key: statistics.median(r[key] for r in rows) for key in PHASES if all(key in r for r in rows)}
    return medians | {"wall": wall}


def table(sync: dict[str, float], overlapped: dict[str, float], num_rollout: int) -> list[str]:
    r, t, s = sync["perf/rollout_seconds"], sync["perf/train_seconds"], sync["sync/seconds"]
    projected = max(r, t + s) / (r + t + s)
    lines = [
        f"Measured {datetime.date.today()}, {machine_line()}; `benchmarks/async_rollout.py --num-rollout {num_rollout}`"
        " (medians over rollouts 1..N-1).", "",
        "| seconds per rollout | synchronous | --async-rollout | ratio |", "|---|---:|---:|---:|",
    ]
    for key in PHASES:
        a, b = sync.get(key), overlapped.get(key)
        if a is None or b is None:
            continue
        lines.append(f"| `{key}` | {a:.2f} | {b:.2f} | {b / a:.2f} |" if a else f"| `{key}` | {a:.2f} | {b:.2f} | |")
    lines += ["", f"Projected step ratio where engine and trainer have their own devices: max(R, T + S) / (R + T + S) "
                  f"= max({r:.2f}, {t:.2f} + {s:.2f}) / {r + t + s:.2f} = **{projected:.2f}**."]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-rollout", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="slime-async-bench-") as tmp:
        sync = run_demo(Path(tmp) / "sync", args.num_rollout, [])
        overlapped = run_demo(Path(tmp) / "async", args.num_rollout, ["--async-rollout"])
    lines = table(sync, overlapped, args.num_rollout)
    print("\n".join(lines))
    if args.out:
        write_text_atomically(args.out, "# --async-rollout: measured\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
