"""Two task adapters in one run vs one run per task, on SmolLM2-135M-Instruct on the CPU.

Three runs, one after the other (never two at once), each in a fresh process tree:

* two-task: ``examples/lora/run-smollm2-135m-multitask.sh`` (tasks ``add`` and ``sub`` on one
  frozen base, ``--lora-tasks``);
* solo add, solo sub: ``examples/lora/run-smollm2-135m-lora.sh`` with ``OP=add`` / ``OP=sub``.

All with ``NUM_ROLLOUT=N`` (every rollout of the two-task run trains both tasks, so each task gets
N rollouts in every setup) and ``EVAL_INTERVAL=N``: greedy held-out accuracy on each task's 100
eval prompts before training and after the last rollout, the same eval work in both setups.  The
data files are the same bytes in both (same ``make_arith_data.py`` seed and sizes; checked).

Measured per run: wall seconds of the whole script (start-up, data, Ray, model load, training,
eval, save), peak memory as the largest summed RSS of the script's process tree (Ray's workers
included) sampled every 0.2 s (:func:`benchmarks.vs_trl.run_measured`), the run's own logged
peak ``mem/peak_rss_gib``, and each task's held-out accuracy before and after.  Compared: the
two-task run against the sum of the two solo runs (what training both tasks separately costs),
and each task's final accuracy against its solo run's.

Targets: wall time <= 0.65x the sum, peak memory <= 0.60x the sum, |accuracy two-task - solo|
<= 0.05 per task.

Run:  ``.venv/bin/python benchmarks/multitask.py [--num-rollout 28] [--out docs/multitask-bench.md]``
(``--quick``: 2 rollouts, a smoke run of the pipeline; its ratios mean little).
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

from benchmarks.vs_trl import machine_line, run_measured  # noqa: E402
from slime.utils.atomic import write_text_atomically  # noqa: E402
from slime.utils.metrics import METRICS_FILE, STEP_KEY, read_metrics  # noqa: E402

MULTI = REPO / "examples" / "lora" / "run-smollm2-135m-multitask.sh"
SOLO = REPO / "examples" / "lora" / "run-smollm2-135m-lora.sh"
TASKS = ("add", "sub")
SOLO_EVAL_SET = "arith"  # the one-task demo's --eval-prompt-data name
WALL_RATIO_MAX = 0.65
MEMORY_RATIO_MAX = 0.60
ACCURACY_DIFF_MAX = 0.05
QUICK_ROLLOUTS = 2


@dataclass
class Run:
    """One run's figures; ``accuracy[task] = (before, after)`` held-out reward mean."""

    name: str
    wall_s: float
    peak_gib: float
    own_peak_gib: float | None = None
    accuracy: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """A run to make: its name, command, extra environment, and output directory."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    out: Path
    tasks: dict[str, str]  # task -> the eval metric its accuracy is read from


def jobs(work: Path, rollouts: int, python: str = sys.executable) -> list[Job]:
    """The two-task run, then one solo run per task, writing under ``work``."""
    common = {"NUM_ROLLOUT": str(rollouts), "EVAL_INTERVAL": str(rollouts), "PYTHON": python,
              "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    runs = [Job("two-task", ["bash", str(MULTI)], {**common, "OUT": str(work / "two-task")}, work / "two-task",
                {t: f"{t}/eval/{t}/reward_mean" for t in TASKS})]
    for task in TASKS:
        out = work / f"solo-{task}"
        runs.append(Job(f"solo {task}", ["bash", str(SOLO)], {**common, "OP": task, "OUT": str(out)}, out,
                        {task: f"eval/{SOLO_EVAL_SET}/reward_mean"}))
    return runs


def read_run(job: Job, wall_s: float, peak_gib: float, rows: list[dict]) -> Run:
    """A finished run's figures from its metrics.jsonl rows (first and last value of each eval metric)."""
    accuracy = {}
    for task, key in job.tasks.items():
        values = [r[key] for r in sorted(rows, key=lambda r: r[STEP_KEY]) if r.get(key) is not None]
        accuracy[task] = (values[0], values[-1]) if values else (None, None)
    own = [r["mem/peak_rss_gib"] for r in rows if r.get("mem/peak_rss_gib") is not None]
    return Run(job.name, wall_s, peak_gib, max(own) if own else None, accuracy)


def run_job(job: Job, log_dir: Path) -> Run:
    job.out.mkdir(parents=True, exist_ok=True)
    print(f"{job.name}: {shlex.join(job.cmd)} (OUT={job.out}) ...", flush=True)
    wall, peak = run_measured(job.cmd, log_dir / f"{job.out.name}.log", {**os.environ, **job.env})
    run = read_run(job, wall, peak, read_metrics(job.out / METRICS_FILE))
    print(f"{job.name}: {wall:.0f} s, peak {peak:.2f} GiB, accuracy {run.accuracy}", flush=True)
    return run


def check_same_data(work: Path) -> None:
    """Each task's prompts must be the same bytes in its solo run and in the two-task run."""
    for task in TASKS:
        for name in ("train.jsonl", "eval.jsonl"):
            solo, multi = work / f"solo-{task}" / "data" / name, work / "two-task" / f"data-{task}" / name
            if not filecmp.cmp(solo, multi, shallow=False):
                raise SystemExit(f"{solo} differs from {multi}: the runs used other data")


# -- the table ---------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _verdict(target: str, ok: bool | None) -> str:
    return target if ok is None else f"{target} {'met' if ok else 'MISSED'}"


def _ratio_row(label: str, multi: float | None, solos: list[float | None], limit: float,
               spec: str) -> list[str]:
    total = sum(solos) if all(v is not None for v in solos) else None
    ratio = multi / total if multi is not None and total else None
    return [label, _fmt(multi, spec), *(_fmt(v, spec) for v in solos), _fmt(total, spec), _fmt(ratio, ".3f"),
            _verdict(f"<= {limit:.2f}x", None if ratio is None else ratio <= limit)]


def table_rows(multi: Run, solos: list[Run]) -> list[list[str]]:
    """Cells: what, two-task, solo per task, solo sum, two-task / sum (or - solo), target with met/MISSED."""
    rows = [_ratio_row("wall s (whole script)", multi.wall_s, [s.wall_s for s in solos], WALL_RATIO_MAX, ".0f"),
            _ratio_row("peak RSS GiB (process tree, sampled)", multi.peak_gib, [s.peak_gib for s in solos],
                       MEMORY_RATIO_MAX, ".2f"),
            _ratio_row("peak RSS GiB (run's own mem/peak_rss_gib)", multi.own_peak_gib,
                       [s.own_peak_gib for s in solos], MEMORY_RATIO_MAX, ".2f")]
    rows[-1][-1] = "-"  # informative: the target is judged on the sampled tree
    for i, solo in enumerate(solos):
        task = next(iter(solo.accuracy))
        for when, index in (("before", 0), ("after", 1)):
            ours, theirs = multi.accuracy.get(task, (None, None))[index], solo.accuracy[task][index]
            diff = ours - theirs if ours is not None and theirs is not None else None
            cells = ["-"] * len(solos)
            cells[i] = _fmt(theirs, ".2f")
            target = "-" if when == "before" else _verdict(f"abs <= {ACCURACY_DIFF_MAX:.2f}", None if diff is None
                                                           else abs(diff) <= ACCURACY_DIFF_MAX + 1e-9)
            rows.append([f"{task}: held-out accuracy {when}", _fmt(ours, ".2f"), *cells, "-",
                         _fmt(diff, "+.2f"), target])
    return rows


def markdown_table(rows: list[list[str]], solo_names: list[str]) -> str:
    header = ["", "two-task run", *solo_names, "solo sum", "two-task / sum (acc: minus solo)", "target"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def report(multi: Run, solos: list[Run], rollouts: int, command: str, wall_s: float, machine: str,
           date: str) -> str:
    return "\n".join([
        "# Two task adapters in one run vs one run per task", "",
        f"Date: {date}. Machine: {machine}. Command: `{command}` ({wall_s:.0f} s).", "",
        markdown_table(table_rows(multi, solos), [s.name for s in solos]), "",
        f"SmolLM2-135M-Instruct, LoRA r=16 on every linear module, {rollouts} rollouts per task (8 prompts x 4 "
        "samples each), greedy accuracy on 100 held-out prompts per task before training and after the last "
        "rollout. Runs one after another on this machine; wall times compare within one invocation only.", ""])


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-rollout", type=int, default=28, help="rollouts per task in every run (default 28)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_ROLLOUTS} rollouts: a smoke run")
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    p.add_argument("--work", type=Path, default=None, help="where the runs write (default: a new temporary dir)")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.num_rollout = QUICK_ROLLOUTS
    if opts.num_rollout < 1:
        p.error(f"--num-rollout must be >= 1 (got {opts.num_rollout})")
    return opts


def measure(work: Path, rollouts: int) -> tuple[Run, list[Run]]:
    """Make the three runs under ``work``; (two-task, [solo per task])."""
    runs = [run_job(job, work) for job in jobs(work, rollouts)]
    check_same_data(work)
    return runs[0], runs[1:]


def main(argv: list[str] | None = None) -> None:
    opts = parse_cli(argv)
    start = time.perf_counter()
    command = shlex.join([".venv/bin/python", "benchmarks/multitask.py", *(sys.argv[1:] if argv is None else argv)])
    work = opts.work or Path(tempfile.mkdtemp(prefix="multitask-bench-"))  # kept: logs, metrics, adapters
    print(f"logs and outputs under {work}", flush=True)
    multi, solos = measure(work, opts.num_rollout)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    text = report(multi, solos, opts.num_rollout, command, time.perf_counter() - start, machine_line(), date)
    print(text, flush=True)
    if opts.out:
        write_text_atomically(opts.out, text)


if __name__ == "__main__":
    main()
