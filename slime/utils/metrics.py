"""Metrics of an RL run: a JSONL log, optional wandb/tensorboard, curves, terminal lines.

:class:`MetricsLogger` appends one JSON object per :meth:`~MetricsLogger.log`
call to ``<log-dir>/metrics.jsonl``::

    {"rollout_id": 3, "rollout/reward_mean": 0.41, "train/loss": -0.012, ...}

Each line is flushed as it is written, so a killed run keeps every row it
logged (at worst the last line is torn; readers skip it).  A resumed run drops
the rows at or after its resume step first, so the file never holds a rollout
twice.  Non-finite values are written as ``null`` (JSON has no NaN).

Metric names are ``<group>/<name>``; the ones this module draws or prints are
the constants below, and ``eval/<dataset>/reward_mean`` for each eval set.  A run with
``--lora-tasks`` logs a task's metrics under the task's name (``add/rollout/reward_mean``,
``add/eval/add/reward_mean``, ``add/train/loss``); the curves then draw one line per task.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, TextIO

from slime.utils.atomic import write_file_atomically, write_text_atomically
from slime.utils.errors import UserError

REWARD_KEY = "rollout/reward_mean"
RESPONSE_LEN_KEY = "rollout/response_len_mean"
LOSS_KEY = "train/loss"
KL_KEY = "train/kl"
LOGPROB_GAP_KEY = "train/rollout_logprob_abs_diff"  # mean |trainer log-prob - rollout log-prob| over response tokens
STEP_TIME_KEY = "perf/step_seconds"
PEAK_MEM_KEY = "mem/peak_rss_gib"  # PeakMemoryTracker.metrics()
EVAL_REWARD_PATTERN = re.compile(r"^eval/(?P<name>.+)/reward_mean$")
# <task>/<group>/...: a task's own metrics in a --lora-tasks run (task names: slime.utils.tasks.NAME_PATTERN).
TASK_KEY_PATTERN = re.compile(r"^(?P<task>[A-Za-z][A-Za-z0-9_]{0,47})/(?P<key>(?:rollout|train|eval)/.+)$")
_GROUPS = frozenset({"rollout", "train", "eval", "perf", "mem", "sync"})  # never a task (a plain eval set "rollout")

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
WANDB_ID_FILE = "wandb_run_id"
STEP_KEY = "rollout_id"

Row = dict[str, Any]


# -- the JSONL file ------------------------------------------------------------


def _json_value(name: str, value: Any) -> float | None:
    """A metric as a JSON number; non-finite becomes None.  Accepts 0-d tensors and numpy scalars."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric '{name}' must be a number, got {type(value).__name__}") from None
    return number if math.isfinite(number) else None


def read_metrics(path: str | os.PathLike) -> list[Row]:
    """Rows of a metrics.jsonl, in file order; a torn line (a run killed mid-write) is skipped."""
    rows: list[Row] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get(STEP_KEY), int):
                rows.append(row)
    return rows


def _keep_rows_before(path: Path, resume_step: int) -> None:
    """Rewrite ``path`` with only the rows logged before ``resume_step`` (atomically).

    A fresh run (``resume_step == 0``) keeps nothing, not even an earlier run's pre-training
    evaluation, which is logged as step -1.
    """
    fresh = resume_step == 0 or not path.exists()
    kept = [] if fresh else [row for row in read_metrics(path) if row[STEP_KEY] < resume_step]
    write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in kept))


class _Sink(Protocol):
    def log(self, step: int, metrics: Mapping[str, float | None]) -> None: ...

    def close(self) -> None: ...


class _JsonlSink:
    def __init__(self, path: Path, resume_step: int) -> None:
        _keep_rows_before(path, resume_step)
        self._file = open(path, "a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, float | None]) -> None:
        self._file.write(json.dumps({STEP_KEY: step, **metrics}) + "\n")
        self._file.flush()  # in the OS's hands now: survives the process being killed

    def close(self) -> None:
        self._file.close()


# -- wandb and tensorboard -----------------------------------------------------


def _import_for_flag(module: str, flag: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{flag} needs pip install {package} (or drop {flag})") from None


class _WandbSink:
    """One wandb run per log dir: its id is kept in the dir, so a resumed run continues it.

    wandb only accepts increasing steps: for the rollouts a killed run had already
    sent after its last checkpoint, the first values stay on the wandb server
    (metrics.jsonl and tensorboard hold the re-run's values).
    """

    def __init__(self, wandb: Any, project: str, log_dir: Path | None, config: Mapping[str, Any],
                 resume_step: int) -> None:
        run_id = _wandb_run_id(log_dir, resume_step) if log_dir is not None else None
        self._run = wandb.init(project=project, dir=str(log_dir) if log_dir else None, config=dict(config),
                               id=run_id, resume="allow" if run_id else None)

    def log(self, step: int, metrics: Mapping[str, float | None]) -> None:
        self._run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def close(self) -> None:
        self._run.finish()


def _wandb_run_id(log_dir: Path, resume_step: int) -> str:
    id_file = log_dir / WANDB_ID_FILE
    if resume_step > 0 and id_file.exists():
        return id_file.read_text(encoding="utf-8").strip()
    run_id = secrets.token_hex(8)
    write_text_atomically(id_file, run_id + "\n")
    return run_id


class _TensorboardSink:
    def __init__(self, summary_writer: type, log_dir: Path, resume_step: int) -> None:
        # purge_step drops events a killed run logged after its last checkpoint.
        self._writer = summary_writer(log_dir=str(log_dir / "tensorboard"),
                                      purge_step=resume_step if resume_step > 0 else None)

    def log(self, step: int, metrics: Mapping[str, float | None]) -> None:
        for name, value in metrics.items():
            if value is not None:
                self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# -- the logger ----------------------------------------------------------------


class MetricsLogger:
    """Log per-rollout metrics to ``<log_dir>/metrics.jsonl`` and, if asked, wandb and tensorboard.

    Args:
        log_dir: where metrics.jsonl, curves.png (and tensorboard/) go; None logs to wandb only.
        use_wandb / wandb_project: log to wandb too (``WANDB_MODE=offline`` works without a network).
        use_tensorboard: write tensorboard event files under ``<log_dir>/tensorboard``.
        resume_step: the first rollout id this run will log.  Rows with ``rollout_id >= resume_step``
            left by an earlier (killed) run are dropped; 0, a fresh run, starts the file empty.
        config: the run's settings, recorded by wandb.
    """

    def __init__(self, log_dir: str | os.PathLike | None, *, use_wandb: bool = False,
                 wandb_project: str = "slime-lora", use_tensorboard: bool = False, resume_step: int = 0,
                 config: Mapping[str, Any] | None = None) -> None:
        if resume_step < 0:
            raise ValueError(f"resume_step must be >= 0 (got {resume_step})")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        # Check every optional package before creating anything, so a missing one leaves no trace.
        summary_writer = None
        if use_tensorboard:
            if self.log_dir is None:
                raise UserError("--use-tensorboard needs --log-dir DIR (event files go to DIR/tensorboard)")
            summary_writer = _import_for_flag("torch.utils.tensorboard", "--use-tensorboard",
                                              "tensorboard").SummaryWriter
        wandb = _import_for_flag("wandb", "--use-wandb", "wandb") if use_wandb else None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)

        self._sinks: list[_Sink] = []
        if self.log_dir is not None:
            self._sinks.append(_JsonlSink(self.log_dir / METRICS_FILE, resume_step))
        if summary_writer is not None:
            self._sinks.append(_TensorboardSink(summary_writer, self.log_dir, resume_step))
        if wandb is not None:
            self._sinks.append(_WandbSink(wandb, wandb_project, self.log_dir, config or {}, resume_step))
        self._closed = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, resume_step: int = 0) -> MetricsLogger:
        """Built from ``--log-dir --use-wandb --wandb-project --use-tensorboard``."""
        config = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
        return cls(args.log_dir, use_wandb=args.use_wandb, wandb_project=args.wandb_project,
                   use_tensorboard=args.use_tensorboard, resume_step=resume_step, config=config)

    @property
    def metrics_path(self) -> Path | None:
        return self.log_dir / METRICS_FILE if self.log_dir is not None else None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` for rollout ``step`` everywhere; several calls per step are fine."""
        if self._closed:
            raise RuntimeError("MetricsLogger.log() after close()")
        if STEP_KEY in metrics:
            raise ValueError(f"'{STEP_KEY}' is the step, pass it as `step`, not as a metric")
        values = {name: _json_value(name, value) for name, value in metrics.items()}
        for sink in self._sinks:
            sink.log(step, values)

    def write_curves(self) -> Path | None:
        """Redraw ``<log_dir>/curves.png`` from everything in metrics.jsonl (this run and the resumed one)."""
        if self.metrics_path is None:
            return None
        path = self.log_dir / CURVES_FILE
        plot_curves(read_metrics(self.metrics_path), path, title=f"RL run: {self.log_dir.resolve().name}")
        return path

    def close(self) -> None:
        """Close every sink, then draw the curves; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        for sink in self._sinks:
            sink.close()
        self.write_curves()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- curves --------------------------------------------------------------------


def _series(rows: Iterable[Row], key: str) -> tuple[list[int], list[float]]:
    points = [(row[STEP_KEY], row[key]) for row in rows if row.get(key) is not None]
    return [x for x, _ in points], [y for _, y in points]


def _eval_names(rows: Iterable[Row], prefix: str = "") -> list[str]:
    """Eval set names of ``<prefix>eval/<name>/reward_mean`` keys (prefix ``"add/"`` for task add)."""
    names = {m["name"] for row in rows for key in row
             if key.startswith(prefix) and (m := EVAL_REWARD_PATTERN.match(key[len(prefix):]))}
    return sorted(names)


def task_names(rows: Iterable[Row]) -> list[str]:
    """The tasks with metrics of their own (``<task>/rollout|train|eval/...`` keys), sorted; [] in a one-task run."""
    names = {m["task"] for row in rows for key in row if (m := TASK_KEY_PATTERN.match(key))}
    return sorted(names - _GROUPS)


def _draw_panel(ax: Any, rows: list[Row], key: str, title: str, empty_text: str = "no data yet",
                tasks: Iterable[str] = ()) -> dict[str, Any]:
    """Plot ``key`` and each task's ``<task>/key`` (labelled by task); returns the line colour per label."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("rollout id")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    colours = {}
    for series_key, label in [(key, key.split("/")[0]), *((f"{t}/{key}", t) for t in tasks)]:
        xs, ys = _series(rows, series_key)
        if xs:
            (line,) = ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=label)
            colours[label] = line.get_color()
    if not colours:
        ax.text(0.5, 0.5, empty_text, transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
    elif list(tasks):  # several lines: say which is which
        ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    return colours


def _draw_evals(ax: Any, rows: list[Row], tasks: list[str], colours: Mapping[str, Any]) -> None:
    """Eval markers on the reward panel: the run's eval sets, then each task's in its line's colour."""
    for name in _eval_names(rows):
        xs, ys = _series(rows, f"eval/{name}/reward_mean")
        ax.plot(xs, ys, linestyle="none", marker="D", label=f"eval: {name}")
    for task in tasks:
        # A task's eval sets share its colour; the marker tells them apart.
        for name, marker in zip(_eval_names(rows, f"{task}/"), itertools.cycle("Ds^vP")):
            xs, ys = _series(rows, f"{task}/eval/{name}/reward_mean")
            ax.plot(xs, ys, linestyle="none", marker=marker, color=colours.get(task),
                    label=f"eval: {task}" if name == task else f"eval: {task} {name}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")


def plot_curves(rows: list[Row], path: str | os.PathLike, title: str = "RL run") -> None:
    """:func:`draw_curves` as a PNG, written atomically (:func:`~slime.utils.atomic.write_file_atomically`),
    so a viewer never sees half an image."""
    fig = draw_curves(rows, title)
    write_file_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def draw_curves(rows: list[Row], title: str = "RL run") -> Any:
    """A 2x2 figure (1100 x 750 px at 100 dpi) of reward (with eval markers), response length, loss
    and KL against rollout id.  In a ``--lora-tasks`` run each panel has one line per task, and the
    reward panel each task's eval markers in its line's colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot global state, no display needed.
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    (reward, length), (loss, kl) = fig.subplots(2, 2)
    tasks = task_names(rows)
    colours = _draw_panel(reward, rows, REWARD_KEY, "reward (mean over rollout samples)", tasks=tasks)
    _draw_evals(reward, rows, tasks, colours)
    _draw_panel(length, rows, RESPONSE_LEN_KEY, "response length (tokens, mean)", tasks=tasks)
    _draw_panel(loss, rows, LOSS_KEY, "policy loss", tasks=tasks)
    _draw_panel(kl, rows, KL_KEY, "KL to the reference policy", empty_text="KL not used", tasks=tasks)
    fig.suptitle(title)
    return fig


# -- terminal output -----------------------------------------------------------


def _fmt(value: float | None) -> str:
    """3 significant digits; large values whole, tiny ones in scientific notation."""
    if value is None or not math.isfinite(value):
        return "nan"
    if value == 0 or 1e-3 <= abs(value) < 1e3:
        return f"{value:.3g}"
    return f"{value:.0f}" if abs(value) >= 1e3 else f"{value:.2g}"


_LINE_FIELDS: tuple[tuple[str, str, Callable[[float | None], str]], ...] = (
    ("reward", REWARD_KEY, _fmt),
    ("len", RESPONSE_LEN_KEY, _fmt),
    ("loss", LOSS_KEY, _fmt),
    ("kl", KL_KEY, _fmt),
    ("gap", LOGPROB_GAP_KEY, _fmt),
    ("mem", PEAK_MEM_KEY, lambda v: f"{_fmt(v)} GiB"),
    ("", STEP_TIME_KEY, lambda v: "nan s" if v is None else f"{v:.1f} s"),
)


def format_line(step: int, metrics: Mapping[str, Any]) -> str:
    """One compact line for a terminal or a log, e.g.

    ``rollout 3 | reward 0.41 | eval arith 0.55 | len 23.5 | loss -0.012 | gap 2.1e-06 | 9.8 s``

    Only the metrics present are shown, always in this order.
    """
    values = {name: _json_value(name, value) for name, value in metrics.items()}
    parts = [f"rollout {step}"]
    for label, key, fmt in _LINE_FIELDS:
        if key in values:
            parts.append(f"{label} {fmt(values[key])}".strip())
        if key == REWARD_KEY:
            parts += [f"eval {name} {_fmt(values[f'eval/{name}/reward_mean'])}" for name in _eval_names([values])]
            parts += _task_fields(values)
    return " | ".join(parts)


def _task_fields(values: Mapping[str, float | None]) -> list[str]:
    """``add reward 0.41 | add eval 0.55`` per task of a --lora-tasks run (its eval sets named when not the task)."""
    parts = []
    for task in task_names([values]):
        key = f"{task}/{REWARD_KEY}"
        parts += [f"{task} reward {_fmt(values[key])}"] if key in values else []
        parts += [f"{task} eval{'' if name == task else ' ' + name} {_fmt(values[f'{task}/eval/{name}/reward_mean'])}"
                  for name in _eval_names([values], f"{task}/")]
    return parts


class Progress:
    """Progress of one phase: a tqdm bar on a terminal, plain lines in a log file.

    ``with Progress("rollout 3: generating", total=32, unit="sample") as bar: ... bar.update(4)``

    Whether ``stream`` (default: ``sys.stderr``) is a TTY decides.  Plain mode stays
    quiet for short phases and prints a line every ``plain_every_s`` seconds while a
    long one runs (a long CPU phase shows signs of life), then one when it ends.
    """

    def __init__(self, description: str, total: int | None = None, *, unit: str = "it",
                 stream: TextIO | None = None, plain_every_s: float = 30.0) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._plain_every_s = plain_every_s
        self._bar: Any = None
        self._start = self._last_line = 0.0

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def _count(self) -> str:
        return f"{self.done}/{self.total} {self.unit}" if self.total is not None else f"{self.done} {self.unit}"

    def _print(self, text: str) -> None:
        print(f"{self.description}: {text}", file=self._stream, flush=True)

    def __enter__(self) -> Progress:
        self._start = self._last_line = time.monotonic()
        if self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.description, unit=self.unit, file=self._stream,
                             leave=False, dynamic_ncols=True)
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last_line >= self._plain_every_s:
            self._last_line = time.monotonic()
            self._print(f"{self._count()} after {self.elapsed_s:.1f} s")

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.elapsed_s >= self._plain_every_s or exc_type is not None:
            self._print(f"{'done' if exc_type is None else 'failed'}, {self._count()} in {self.elapsed_s:.1f} s")

