"""MetricsLogger (JSONL, resume, curves, wandb/tensorboard), format_line and Progress."""

from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from slime.utils.arguments import add_logging_arguments
from slime.utils.errors import UserError
from slime.utils.metrics import (CURVES_FILE, KL_KEY, LOGPROB_GAP_KEY, LOSS_KEY, METRICS_FILE, PEAK_MEM_KEY,
                                 RESPONSE_LEN_KEY, REWARD_KEY, STEP_TIME_KEY, MetricsLogger, Progress, format_line,
                                 plot_curves, read_metrics)

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / METRICS_FILE).read_text().splitlines()]


def _log_steps(logger: MetricsLogger, steps: range) -> None:
    for step in steps:
        logger.log(step, {REWARD_KEY: step / 10, LOSS_KEY: -0.01 * step})


def test_each_log_call_is_one_flushed_json_row(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path)
    logger.log(0, {REWARD_KEY: 0.25, LOSS_KEY: torch.tensor(-0.5), RESPONSE_LEN_KEY: np.float32(12.5)})
    # Readable before close: the row is flushed as soon as it is logged.
    assert _rows(tmp_path) == [{"rollout_id": 0, REWARD_KEY: 0.25, LOSS_KEY: -0.5, RESPONSE_LEN_KEY: 12.5}]
    logger.log(1, {LOSS_KEY: float("nan"), KL_KEY: float("inf")})
    logger.log(1, {"eval/arith/reward_mean": 0.5})  # a second row for the same rollout is allowed
    logger.close()
    rows = _rows(tmp_path)
    assert rows[1:] == [{"rollout_id": 1, LOSS_KEY: None, KL_KEY: None},
                        {"rollout_id": 1, "eval/arith/reward_mean": 0.5}]
    assert read_metrics(tmp_path / METRICS_FILE) == rows
    with pytest.raises(RuntimeError, match="after close"):
        logger.log(2, {REWARD_KEY: 1.0})


def test_bad_metrics_are_rejected(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(TypeError, match="'rollout/reward_mean' must be a number"):
            logger.log(0, {REWARD_KEY: "high"})
        with pytest.raises(ValueError, match="rollout_id"):
            logger.log(0, {"rollout_id": 3})


def test_a_killed_run_keeps_every_logged_row(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from slime.utils.metrics import MetricsLogger
        logger = MetricsLogger({str(tmp_path)!r})
        for step in range(3):
            logger.log(step, {{"train/loss": float(step)}})
        os._exit(9)  # no close(), no atexit, no buffer flush: as if killed
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == 9
    assert [row["rollout_id"] for row in _rows(tmp_path)] == [0, 1, 2]


def test_resume_drops_rows_from_the_resume_step_on(tmp_path: Path) -> None:
    first = MetricsLogger(tmp_path)
    _log_steps(first, range(6))  # rollouts 3..5 happened after the last checkpoint
    first.close()
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"rollout_id": 6, "train/lo')  # a line torn by a kill mid-write

    with MetricsLogger(tmp_path, resume_step=3) as resumed:
        assert [row["rollout_id"] for row in _rows(tmp_path)] == [0, 1, 2]
        _log_steps(resumed, range(3, 5))
    ids = [row["rollout_id"] for row in _rows(tmp_path)]
    assert ids == [0, 1, 2, 3, 4]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_fresh_run_starts_an_empty_file(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        _log_steps(logger, range(-1, 4))  # -1: the evaluation before training
    with MetricsLogger(tmp_path) as logger:
        _log_steps(logger, range(1))
    assert [row["rollout_id"] for row in _rows(tmp_path)] == [0]


@pytest.mark.parametrize("with_kl", [True, False])
def test_close_draws_a_valid_png(tmp_path: Path, with_kl: bool) -> None:
    with MetricsLogger(tmp_path) as logger:
        for step in range(5):
            metrics = {REWARD_KEY: 0.1 * step, RESPONSE_LEN_KEY: 20 + step, LOSS_KEY: -0.01 * step}
            if with_kl:
                metrics[KL_KEY] = 0.001 * step
            logger.log(step, metrics)
            if step % 2 == 0:
                logger.log(step, {"eval/arith/reward_mean": 0.2 * step, "eval/gsm/reward_mean": 0.1})
    png = tmp_path / CURVES_FILE
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(png)
    assert image.shape[:2] == (750, 1100)
    assert image.std() > 0.05  # drawn on, not a blank canvas
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURVES_FILE, METRICS_FILE]


def test_curves_of_an_empty_log_and_redraws_replace_the_file(tmp_path: Path) -> None:
    png = tmp_path / "empty.png"
    plot_curves([], png)
    first = png.read_bytes()
    assert first[:8] == PNG_SIGNATURE
    plot_curves([{"rollout_id": 0, REWARD_KEY: 1.0}, {"rollout_id": 1, REWARD_KEY: 0.5}], png)
    assert png.read_bytes() != first
    assert [p.name for p in tmp_path.iterdir()] == ["empty.png"]


def test_from_args_uses_the_logging_flags(tmp_path: Path) -> None:
    args = add_logging_arguments(argparse.ArgumentParser()).parse_args(["--log-dir", str(tmp_path / "run")])
    with MetricsLogger.from_args(args) as logger:
        logger.log(0, {REWARD_KEY: 1.0})
    assert logger.metrics_path == tmp_path / "run" / METRICS_FILE
    assert _rows(tmp_path / "run") == [{"rollout_id": 0, REWARD_KEY: 1.0}]


def test_without_log_dir_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with MetricsLogger(None) as logger:
        logger.log(0, {REWARD_KEY: 1.0})
        assert logger.write_curves() is None
    assert list(tmp_path.iterdir()) == []


def test_use_wandb_without_wandb_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    with pytest.raises(UserError, match="--use-wandb needs pip install wandb"):
        MetricsLogger(tmp_path, use_wandb=True)
    assert not (tmp_path / METRICS_FILE).exists()  # failed before touching the log dir


def test_use_tensorboard_without_tensorboard_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.utils.tensorboard imports tensorboard first thing: block that, and forget a cached import.
    for name in [n for n in sys.modules if n == "torch.utils.tensorboard" or n.startswith("torch.utils.tensorboard.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match="--use-tensorboard needs pip install tensorboard"):
        MetricsLogger(tmp_path, use_tensorboard=True)


def test_use_tensorboard_without_log_dir_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--use-tensorboard needs --log-dir"):
        MetricsLogger(None, use_tensorboard=True)


# -- wandb (offline) and tensorboard, read back from what they wrote ------------


@pytest.fixture
def wandb_offline(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """wandb in offline mode, every directory it may write (HOME too) under a temporary folder.

    Yields the stand-in home directory, so a test can check that wandb left nothing there.
    The wandb service started by the test is shut down afterwards.
    """
    import wandb

    root = tmp_path_factory.mktemp("wandb-env")
    home = root / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # Offline mode never contacts a server; if it tried, this address refuses at once.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(root / var.lower()))
    yield home
    wandb.teardown()


def _wandb_records(path: Path) -> list:
    """The protobuf records of a wandb transaction log (``run-<id>.wandb``).

    The file is a 7-byte header (``:W&B``, magic, version) and then LevelDB's log format:
    32 KiB blocks of records, each a 7-byte header (crc32, length, type) and its bytes; a
    record split over blocks comes as FIRST, MIDDLE..., LAST parts.
    """
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_run(log_dir: Path, run_id: str, started: int) -> dict:
    """What wandb recorded offline in its ``started``-th run directory (0-based) for ``run_id``:
    ``{"history": {step: {key: value}}, "config": {key: value}}`` (wandb's own ``_``-keys dropped)."""
    runs = sorted((log_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    history, config = {}, {}
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    for record in _wandb_records(runs[started] / f"run-{run_id}.wandb"):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {key(item): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "run":
            config.update({key(item): json.loads(item.value_json) for item in record.run.config.update
                           if key(item) != "_wandb"})
    return {"history": history, "config": config}


def test_wandb_offline_records_every_logged_value(tmp_path: Path, wandb_offline: Path) -> None:
    with MetricsLogger(tmp_path, use_wandb=True, wandb_project="test", config={"lr": 0.25, "note": "x"}) as logger:
        logger.log(0, {REWARD_KEY: 0.5, LOSS_KEY: torch.tensor(-1.25), KL_KEY: float("nan")})
        logger.log(1, {REWARD_KEY: 0.75, LOSS_KEY: -0.5, KL_KEY: 0.125})
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    run = _wandb_run(tmp_path, run_id, 0)
    # NaN is not sent (JSON has no NaN), everything else is, at its rollout id.
    assert run["history"] == {0: {REWARD_KEY: 0.5, LOSS_KEY: -1.25},
                              1: {REWARD_KEY: 0.75, LOSS_KEY: -0.5, KL_KEY: 0.125}}
    assert run["config"] == {"lr": 0.25, "note": "x"}
    assert [p for p in wandb_offline.rglob("*") if "wandb" in p.name] == []  # nothing under HOME


def test_wandb_offline_run_is_resumed(tmp_path: Path, wandb_offline: Path) -> None:
    with MetricsLogger(tmp_path, use_wandb=True, wandb_project="test") as logger:
        _log_steps(logger, range(3))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    # wandb names a run directory by the second it started: resume in the next second, as a real
    # resume would, or the second run would write into the first one's directory.
    time.sleep(1.05 - time.time() % 1)
    with MetricsLogger(tmp_path, use_wandb=True, wandb_project="test", resume_step=2) as logger:
        _log_steps(logger, range(2, 4))
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2 and all((run / f"run-{run_id}.wandb").stat().st_size > 0 for run in runs)
    # The same run id, continued: the second run holds the rollouts logged after the resume.
    assert _wandb_run(tmp_path, run_id, 0)["history"] == {s: {REWARD_KEY: s / 10, LOSS_KEY: -0.01 * s}
                                                          for s in range(3)}
    assert _wandb_run(tmp_path, run_id, 1)["history"] == {s: {REWARD_KEY: s / 10, LOSS_KEY: -0.01 * s}
                                                          for s in range(2, 4)}
    assert [p for p in wandb_offline.rglob("*") if "wandb" in p.name] == []


def _tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` read back from the event files under ``log_dir/tensorboard``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    f32 = lambda v: float(np.float32(v))  # noqa: E731  (event files store float32)
    with MetricsLogger(tmp_path, use_tensorboard=True) as logger:
        logger.log(0, {REWARD_KEY: 0.5, LOSS_KEY: torch.tensor(-1.25), KL_KEY: float("nan")})
        logger.log(1, {REWARD_KEY: 0.1, LOSS_KEY: -0.3})
        logger.log(1, {"eval/arith/reward_mean": 0.7})  # a second call for the same rollout
        logger.log(5, {KL_KEY: 0.125})
    assert _tensorboard_scalars(tmp_path) == {
        REWARD_KEY: {0: 0.5, 1: f32(0.1)},
        LOSS_KEY: {0: -1.25, 1: f32(-0.3)},
        KL_KEY: {5: 0.125},  # the NaN of step 0 is not written
        "eval/arith/reward_mean": {1: f32(0.7)},
    }


def test_tensorboard_events_and_resume_purge(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, use_tensorboard=True) as logger:
        _log_steps(logger, range(5))
    with MetricsLogger(tmp_path, use_tensorboard=True, resume_step=3) as logger:
        _log_steps(logger, range(3, 4))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars(REWARD_KEY)] == [0, 1, 2, 3]  # step 4 of the killed run purged
    assert events.Scalars(LOSS_KEY)[2].value == pytest.approx(-0.02)


def test_format_line() -> None:
    metrics = {REWARD_KEY: 0.40625, RESPONSE_LEN_KEY: 23.5, LOSS_KEY: -0.0123, LOGPROB_GAP_KEY: 2.1e-6,
               STEP_TIME_KEY: 9.81, "eval/arith/reward_mean": 0.55, "train/grad_norm": 3.0}
    assert format_line(3, metrics) == \
        "rollout 3 | reward 0.406 | eval arith 0.55 | len 23.5 | loss -0.0123 | gap 2.1e-06 | 9.8 s"
    line = format_line(12, {KL_KEY: 0.0, PEAK_MEM_KEY: 3.21, STEP_TIME_KEY: 1234.5, LOSS_KEY: float("nan"),
                            RESPONSE_LEN_KEY: 1234.4})
    assert line == "rollout 12 | len 1234 | loss nan | kl 0 | mem 3.21 GiB | 1234.5 s"
    assert format_line(0, {}) == "rollout 0"


def test_progress_plain_lines_when_not_a_tty() -> None:
    stream = io.StringIO()
    with Progress("rollout 3: generating", total=32, unit="sample", stream=stream, plain_every_s=0) as bar:
        bar.update(16)
        bar.update(16)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("rollout 3: generating: 16/32 sample after ")
    assert lines[-1].startswith("rollout 3: generating: done, 32/32 sample in ")
    assert "\r" not in stream.getvalue()  # no bar redraws in a log file


def test_progress_is_quiet_for_short_plain_phases() -> None:
    stream = io.StringIO()
    with Progress("rollout 3", total=4, stream=stream, plain_every_s=60) as bar:
        bar.update(4)
    assert stream.getvalue() == ""


def test_progress_reports_a_failed_phase() -> None:
    stream = io.StringIO()
    with pytest.raises(KeyError), Progress("train", stream=stream):
        raise KeyError("boom")
    assert stream.getvalue().splitlines()[-1].startswith("train: failed, 0 it in ")


class _Terminal(io.StringIO):
    """A stream that says it is a terminal (a pseudo-terminal made this test hang under pytest)."""

    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_on_a_tty() -> None:
    tty = _Terminal()
    with Progress("rollout 0: generating", total=8, stream=tty) as bar:
        bar.update(8)
    output = tty.getvalue()
    # tqdm redraws at most every 0.1 s, so an instant update may not show; the bar itself must.
    assert "\r" in output and "/8 [" in output and "rollout 0: generating" in output
