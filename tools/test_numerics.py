"""Run the numerical parity tests under several CPU kernel settings and print their worst errors.

    .venv/bin/python tools/test_numerics.py            # the default settings this CPU can run
    .venv/bin/python tools/test_numerics.py --settings native avx2+mkl-avx2 -- -k peft
    .venv/bin/python tools/test_numerics.py --logs native=a.jsonl avx2=b.jsonl   # tabulate only

A parity test compares two fp32 computations that round differently; which kernels run (and so
how they round) depends on the CPU: PyTorch picks its vectorised kernels by
``ATEN_CPU_CAPABILITY`` (``default`` = no SIMD, ``avx2``, ``avx512``) and MKL its GEMMs by
``MKL_ENABLE_INSTRUCTIONS``.  Forcing them lets one machine check the tolerances that another
CPU will see.  Each setting runs ``pytest -m numerics`` with ``SLIME_NUMERICS_LOG`` set, so every
``tests._support.numerics.assert_close`` appends its observed error; the table then shows, per
assertion, the worst error under each setting, the tolerance, and the margin (tolerance / worst
allowed error ratio; under 10x is flagged).  Exit status: non-zero if any setting's pytest failed.
``--logs`` tabulates logs recorded elsewhere, e.g. by a whole ``make test`` run with
``SLIME_NUMERICS_LOG`` exported (every ``assert_close`` records, marked or not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from slime.utils.atomic import write_text_atomically

ROOT = Path(__file__).resolve().parents[1]
SETTINGS: dict[str, dict[str, str]] = {
    "native": {},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "default+mkl-avx2": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx2+mkl-avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
}
# default+mkl-avx2 gave the same errors as default on an AVX-512 machine (2026-12-03): not run unless asked.
DEFAULT_SETTINGS = ("native", "default", "avx2+mkl-avx2", "avx512")
MIN_MARGIN = 10.0


def cpu_has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def run_setting(name: str, env: dict[str, str], pytest_args: list[str], log: Path) -> tuple[int, float]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")}
    full_env.update(env, SLIME_NUMERICS_LOG=str(log), RAY_AUTH_MODE="disabled")
    print(f"== {name}: {' '.join(f'{k}={v}' for k, v in env.items()) or '(nothing forced)'}", flush=True)
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "numerics", "-p", "no:cacheprovider",
                           *pytest_args], cwd=ROOT, env=full_env)
    return proc.returncode, time.time() - start


def worst_per_assertion(logs: dict[str, Path]) -> dict[tuple[str, str], dict]:
    """``(test, what) -> {"atol", "rtol", setting: (max_abs, worst_ratio)}`` over every recorded call."""
    table: dict[tuple[str, str], dict] = defaultdict(dict)
    for setting, log in logs.items():
        if not log.exists():
            continue
        for line in log.read_text().splitlines():
            e = json.loads(line)
            row = table[(e["test"], e["what"])]
            row.setdefault("atol", e["atol"])
            row.setdefault("rtol", e["rtol"])
            # one assertion label may be called with scaled tolerances: keep the worst ratio's call
            previous = row.get(setting)
            if previous is None or e["worst_ratio"] > previous[1]:
                row[setting] = (e["max_abs"], e["worst_ratio"], e["atol"])
    return table


def format_table(table: dict[tuple[str, str], dict], settings: list[str]) -> list[str]:
    lines = ["| test | assertion | " + " | ".join(f"{s}: max abs err" for s in settings)
             + " | atol | rtol | margin |", "|---" * (len(settings) + 5) + "|"]
    flagged = 0
    for (test, what), row in sorted(table.items()):
        ratios = [row[s][1] for s in settings if s in row]
        worst = max(ratios) if ratios else 0.0
        margin = float("inf") if worst == 0 else 1.0 / worst
        flagged += margin < MIN_MARGIN
        cells = [f"{row[s][0]:.2e}" if s in row else "-" for s in settings]
        atols = sorted({row[s][2] for s in settings if s in row})
        atol = f"{atols[0]:.2e}" if len(atols) == 1 else f"{atols[0]:.1e}..{atols[-1]:.1e}"
        mark = "" if margin >= MIN_MARGIN else " (< 10x)"
        lines.append(f"| {test.split('::', 1)[-1]} | {what} | " + " | ".join(cells)
                     + f" | {atol} | {row['rtol']:g} | {margin:.1f}x{mark} |")
    lines.append(f"{len(table)} assertions, {flagged} with a margin under {MIN_MARGIN:g}x")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=None,
                        help=f"default: {' '.join(DEFAULT_SETTINGS)} (avx512 only where the CPU has it)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--logs", nargs="+", metavar="NAME=PATH", default=None,
                        help="run nothing: tabulate these recorded logs, one column each")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest (e.g. -k peft)")
    args = parser.parse_args(argv)
    if args.logs:
        logs = dict(item.split("=", 1) for item in args.logs)
        lines = format_table(worst_per_assertion({k: Path(v) for k, v in logs.items()}), list(logs))
        print("\n".join(lines))
        if args.out:
            write_text_atomically(args.out, "\n".join(lines) + "\n")
        return 0
    settings = args.settings or [s for s in DEFAULT_SETTINGS if s != "avx512" or cpu_has_avx512()]
    failed = []
    with tempfile.TemporaryDirectory(prefix="numerics-") as tmp:
        logs = {s: Path(tmp) / f"{s}.jsonl" for s in settings}
        for s in settings:
            rc, seconds = run_setting(s, SETTINGS[s], args.pytest_args, logs[s])
            print(f"== {s}: pytest exit {rc} in {seconds:.0f} s", flush=True)
            if rc != 0:
                failed.append(s)
        lines = format_table(worst_per_assertion(logs), settings)
    print("\n".join(lines))
    if args.out:
        write_text_atomically(args.out, "\n".join(lines) + "\n")
    if failed:
        print(f"failed under: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
