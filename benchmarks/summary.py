"""``make bench``: this project's benchmarks in one invocation, as one table of ratios.

Each part runs its own benchmark module's measuring functions, one after another (never two at
once, so none slows another), on this machine:

1. LoRA vs full fine-tuning (:mod:`benchmarks.lora_vs_full`): step time, peak RSS and
   trainable state (parameters + gradients + AdamW), LoRA / full, at that module's defaults.
2. Weight bytes per sync: a rank-16 adapter on every linear module of SmolLM2-135M (what a
   LoRA run sends the engine after each step) / the model's weights (what full-parameter RL
   sends), both counted tensor by tensor from the files.
3. Rollout engines (:mod:`benchmarks.engines`): tokens/s with a live adapter / without, for the
   built-in engine and vLLM; vLLM / built-in with the adapter; and, unless ``--quick``, the
   demo's RL step time and peak memory with vLLM / with the built-in engine.  vLLM rows need
   ``.venv-vllm`` (``make setup-vllm``); without it they say so.
4. Against TRL (:mod:`benchmarks.vs_trl`), when ``trl`` is importable (``pip install -e
   '.[bench]'``): our median step time and peak memory / TRL's, ``--trl-steps`` steps each.
5. Several task adapters in one run vs one run per task (:mod:`benchmarks.multitask`, unless
   ``--quick``): the two-task demo's wall time and peak memory / the sum of the two one-task
   demos', at ``MULTITASK_ROLLOUTS`` rollouts per task; each task's accuracy against its solo run
   is in that module's own table (``benchmarks/multitask.py``, 28 rollouts).

Ratios below 1 mean the first named is smaller (faster, lighter).  Wall times drift between
runs on shared machines; ratios measured in one run are the figures to compare.

Run:  ``make bench`` (= ``.venv/bin/python benchmarks/summary.py --out docs/bench.md``);
``--quick`` skips the RL demo runs and TRL (~10 minutes instead of ~40 on a 2-core machine).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(REPO))

from benchmarks import engines, lora_vs_full, multitask, vs_trl  # noqa: E402
from slime.utils.atomic import write_text_atomically  # noqa: E402

Row = tuple[str, "float | None", str]  # (what, ratio or None, how it was measured / why missing)
MULTITASK_ROLLOUTS = 7  # per task and run; the accuracy comparison needs multitask.py's 28


def lora_vs_full_rows() -> list[Row]:
    opts = lora_vs_full.parse_cli([])
    full, lora = lora_vs_full.spawn(opts, "full"), lora_vs_full.spawn(opts, "lora")
    how = f"SmolLM2-135M shape, {opts.batch} x {opts.seq} tokens per step, r={opts.rank}"
    return [("LoRA / full: step time", lora.step_s / full.step_s, how),
            ("LoRA / full: peak RSS", lora.peak_rss / full.peak_rss, how),
            ("LoRA / full: trainable state bytes", lora.state_bytes / full.state_bytes, how)]


def tensor_bytes(directory: Path) -> int:
    """Sum of ``numel * element_size`` over every tensor in the directory's safetensors files."""
    from safetensors import safe_open

    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                sliced = f.get_slice(key)
                total += _numel(sliced.get_shape()) * _element_size(sliced.get_dtype())
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _element_size(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}[dtype]


def sync_row(model_dir: Path, adapter_dir: Path) -> Row:
    adapter, model = tensor_bytes(adapter_dir), tensor_bytes(model_dir)
    return ("sync bytes per step: LoRA adapter / full weights", adapter / model,
            f"r={engines.LORA_R} on all linear modules, {adapter / 2**20:.1f} MiB vs {model / 2**20:.0f} MiB")


def engine_rows(model_dir: Path, adapter_dir: Path, work: Path, quick: bool) -> list[Row]:
    from slime.rollout.vllm_server import find_vllm_python, vllm_python_error

    names = ["hf"] + ([] if vllm_python_error(find_vllm_python(None)) else ["vllm"])
    tput = {n: engines.measure_throughput(n, model_dir, adapter_dir, work, calls=3) for n in names}
    how = f"{len(engines.PAIRS) * engines.SAMPLES} x {engines.MAX_NEW_TOKENS} tokens, fp32"
    rows: list[Row] = [(f"{engines.LABELS[n]}: tokens/s with adapter / base",
                        tput[n]["lora_tokens_per_s"] / tput[n]["base_tokens_per_s"], how) for n in names]
    if "vllm" not in names:
        return rows + [("vLLM rows", None, "no vLLM environment: make setup-vllm")]
    rows.append(("vLLM / built-in: tokens/s with adapter",
                 tput["vllm"]["lora_tokens_per_s"] / tput["hf"]["lora_tokens_per_s"], how))
    if quick:
        return rows + [("vLLM / built-in: RL step time, peak memory", None, "skipped (--quick)")]
    rl = {n: engines.measure_rl(n, work, rollouts=3) for n in names}
    return rows + [("vLLM / built-in: RL step time", rl["vllm"]["step_seconds"] / rl["hf"]["step_seconds"],
                    "the demo, 3 rollouts, median step without eval"),
                   ("vLLM / built-in: RL peak memory", rl["vllm"]["peak_rss_gib"] / rl["hf"]["peak_rss_gib"],
                    "every process of the run")]


def trl_rows(steps: int, work: Path, quick: bool) -> list[Row]:
    if quick:
        return [("ours / TRL: step time, peak memory", None, "skipped (--quick)")]
    if importlib.util.find_spec("trl") is None:
        return [("ours / TRL: step time, peak memory", None, "trl not installed: pip install -e '.[bench]'")]
    model_dir, data_dir = vs_trl.prepare_inputs(work / "vs_trl")
    trl = vs_trl.run_trl(model_dir, data_dir, work / "vs_trl" / "trl", steps)
    ours = vs_trl.run_ours(work / "vs_trl" / "ours", steps)
    how = f"the demo task, {steps} steps each, same data"
    return [("ours / TRL: median step time", ours.median_step_s / trl.median_step_s, how),
            ("ours / TRL: peak memory (process tree)", ours.peak_rss_gib / trl.peak_rss_gib, how)]


def multitask_rows(work: Path, quick: bool) -> list[Row]:
    what = "two tasks in one run / one run per task (sum)"
    if quick:
        return [(f"{what}: wall time, peak memory", None, "skipped (--quick)")]
    multi, solos = multitask.measure(work / "multitask", MULTITASK_ROLLOUTS)
    how = f"the add+sub demo vs the add and sub demos, {MULTITASK_ROLLOUTS} rollouts per task, whole scripts"
    return [(f"{what}: wall time", multi.wall_s / sum(s.wall_s for s in solos), how),
            (f"{what}: peak RSS (process tree)", multi.peak_gib / sum(s.peak_gib for s in solos), how)]


def markdown(rows: list[Row], command: str, wall_s: float) -> str:
    lines = ["# Benchmarks: one table of ratios", "",
             f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}. "
             f"Machine: {vs_trl.machine_line()}. Command: `{command}` ({wall_s:.0f} s).", "",
             "| ratio | value | measured on |", "|---|---:|---|"]
    lines += [f"| {what} | {'-' if ratio is None else format(ratio, '.3f')} | {how} |" for what, ratio, how in rows]
    return "\n".join([*lines, "", "Below 1: the first named is smaller (faster, lighter). Wall-time ratios "
                      "compare within this run only.", ""])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    p.add_argument("--quick", action="store_true", help="no RL demo runs, no TRL")
    p.add_argument("--trl-steps", type=int, default=8, help="steps per system against TRL (default 8)")
    opts = p.parse_args(argv)
    from slime.utils.model_prep import prepare_model

    start = time.perf_counter()
    command = shlex.join([".venv/bin/python", "benchmarks/summary.py", *(sys.argv[1:] if argv is None else argv)])
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    print(f"logs and outputs under {work}", flush=True)
    model_dir = prepare_model(engines.MODEL_NAME)
    adapter_dir = engines.make_adapter(model_dir, work / "adapter")
    rows = lora_vs_full_rows() + [sync_row(model_dir, adapter_dir)]
    rows += engine_rows(model_dir, adapter_dir, work, opts.quick) + trl_rows(opts.trl_steps, work, opts.quick)
    rows += multitask_rows(work, opts.quick)
    text = markdown(rows, command, time.perf_counter() - start)
    print(text, flush=True)
    if opts.out:
        write_text_atomically(opts.out, text)


if __name__ == "__main__":
    main()
