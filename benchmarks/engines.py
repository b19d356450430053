"""The two rollout engines side by side: the built-in one (``hf``) and vLLM (``vllm``), on the CPU.

Measured, on SmolLM2-135M-Instruct (``prepare_model("smollm2-135m-instruct")``), fp32:

1. Rollout throughput.  Each engine runs in a fresh child process (so its memory is its own):
   32 requests x 48 new tokens (8 distinct chat prompts "What is a + b?" x 4 samples, as one
   GRPO batch of the demo), T=1, a fixed seed, ``stop_token_ids=[]`` so every request makes all
   48 tokens.  First the base model, then with a live rank-16 (alpha 32) adapter with random B
   on every linear module (``tests/_support/adapters.py::peft_adapter_with_random_b``), read with
   ``read_peft_adapter`` and pushed by tensors through ``apply_update`` as the RL loop does.
   Reported: tokens/s (median of 3 timed ``generate`` calls after 1 warm-up call), the engine's
   start-up seconds (its constructor; for vLLM the server start), the adapter load seconds, and
   the peak summed RSS of the child's process tree (for vLLM: the server and its children too),
   sampled every 0.2 s.
2. The demo's RL step.  ``examples/lora/run-smollm2-135m-lora.sh`` runs once per engine
   (``--rollout-engine hf`` / ``vllm``) with ``NUM_ROLLOUT=3 EVAL_INTERVAL=100``: eval (100
   greedy prompts) runs before the first rollout and inside the last one, and its seconds
   (``perf/eval_*_seconds``) are subtracted from that step.  Reported from each run's
   ``metrics.jsonl``: median ``perf/step_seconds`` (eval excluded), ``perf/rollout_seconds`` and
   ``perf/train_seconds`` over the rollouts, and the max ``mem/peak_rss_gib`` (every process of
   the run: Ray, trainer, engine).

The last column is vLLM / built-in.  Wall times compare only within one run on one machine (on
the 2-core VMs they drift by up to 25% between runs); the ratios are the stable figures.

Run:  ``.venv/bin/python benchmarks/engines.py --out docs/engines-bench.md``  (``--skip-rl`` for
part 1 only, ``--rollouts N`` for the RL runs, ``--engines hf`` for one engine; ``--help``).
It takes ~15 minutes on a 2-core VM, most of it vLLM start-ups; vLLM comes from ``.venv-vllm``
(``make setup-vllm``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(REPO))

from benchmarks.vs_trl import GIB, TreeRssSampler, machine_line  # noqa: E402 (stdlib + slime.utils only)
from slime.utils.atomic import write_text_atomically  # noqa: E402
from slime.utils.metrics import METRICS_FILE, STEP_KEY, read_metrics  # noqa: E402

DEMO = REPO / "examples" / "lora" / "run-smollm2-135m-lora.sh"
MODEL_NAME = "smollm2-135m-instruct"
ENGINES = ("hf", "vllm")
LABELS = {"hf": "built-in (hf)", "vllm": "vLLM"}
PAIRS = [(3, 4), (7, 12), (15, 6), (9, 9), (20, 1), (11, 13), (2, 18), (16, 5)]  # 8 distinct prompts
SAMPLES = 4
MAX_NEW_TOKENS = 48
SEED = 1234
LORA_R, LORA_ALPHA = 16, 32
CHILD_TIMEOUT_S = 1800

# (label, part, key in the part's result, format)
ROWS = [
    ("engine start-up s", "throughput", "start_seconds", ".1f"),
    ("tokens/s, base model", "throughput", "base_tokens_per_s", ".1f"),
    ("tokens/s, rank-16 adapter", "throughput", "lora_tokens_per_s", ".1f"),
    ("adapter load s (apply_update)", "throughput", "adapter_load_seconds", ".2f"),
    ("engine peak RSS GiB (process tree)", "throughput", "peak_rss_gib", ".2f"),
    ("RL step s (median, eval excluded)", "rl", "step_seconds", ".1f"),
    ("RL rollout s (median)", "rl", "rollout_seconds", ".1f"),
    ("RL train s (median)", "rl", "train_seconds", ".1f"),
    ("RL peak RSS GiB, all processes (max)", "rl", "peak_rss_gib", ".2f"),
]


# -- the child: one engine's throughput ---------------------------------------------------------


def chat_prompts(model_dir: Path) -> list[list[int]]:
    """The 8 prompts x 4 samples as token ids, each group's samples consecutive (one GRPO batch)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for a, b in PAIRS:
        text = tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}], tokenize=False,
                                       add_generation_prompt=True)
        prompts += [tok(text, add_special_tokens=False)["input_ids"]] * SAMPLES
    return prompts


def make_engine(name: str, model_dir: Path):
    """The engine as train.py builds it by default (fp32, every CPU, adapter merged for hf)."""
    import torch

    from slime.rollout.engines import engine_class

    kwargs = {"hf_checkpoint_dir": str(model_dir), "dtype": torch.float32, "num_threads": os.cpu_count(),
              "merge_adapters": True}
    if name == "vllm":
        from slime.rollout.vllm_engine import VLLMOptions

        kwargs["options"] = VLLMOptions(lora_rank=LORA_R)
    return engine_class(name)(**kwargs)


def tokens_per_second(engine, prompts: list[list[int]], lora: str | None, calls: int) -> tuple[float, int]:
    """Median tokens/s of ``calls`` timed generate calls after one warm-up; and tokens per call."""
    from slime.rollout.engine import SamplingParams

    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=SEED, stop_token_ids=[])
    engine.generate(prompts, params, lora)
    rates, tokens = [], 0
    for _ in range(calls):
        start = time.perf_counter()
        outputs = engine.generate(prompts, params, lora)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for o in outputs)
        rates.append(tokens / seconds)
    return statistics.median(rates), tokens


def run_child(name: str, model_dir: Path, adapter_dir: Path, calls: int) -> dict:
    """Part 1 for one engine, in this (fresh) process; the peak RSS covers this process and its children."""
    from slime.rollout.engine import POLICY_ADAPTER
    from slime.utils.peft_format import read_peft_adapter

    prompts = chat_prompts(model_dir)
    with TreeRssSampler(os.getpid()) as sampler:
        start = time.perf_counter()
        engine = make_engine(name, model_dir)
        result = {"start_seconds": time.perf_counter() - start}
        try:
            result["base_tokens_per_s"], result["tokens_per_call"] = tokens_per_second(engine, prompts, None, calls)
            adapter = read_peft_adapter(adapter_dir)
            start = time.perf_counter()
            engine.apply_update((adapter.state_dict(), adapter.config))
            result["adapter_load_seconds"] = time.perf_counter() - start
            result["lora_tokens_per_s"], _ = tokens_per_second(engine, prompts, POLICY_ADAPTER, calls)
        finally:
            if hasattr(engine, "shutdown"):
                engine.shutdown()
    result["peak_rss_gib"] = sampler.peak_bytes / GIB
    return result


# -- the parent: children, demo runs, the table -------------------------------------------------


def _run_logged(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` from the repo root, output to ``log_path``; on failure print its tail and stop."""
    with log_path.open("w") as log:
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=CHILD_TIMEOUT_S).returncode
    if code != 0:
        sys.stderr.write("".join(log_path.read_text().splitlines(keepends=True)[-40:]))
        raise SystemExit(f"{shlex.join(cmd)} failed with exit status {code}; full log: {log_path}")


def measure_throughput(name: str, model_dir: Path, adapter_dir: Path, work: Path, calls: int) -> dict:
    result_path = work / f"throughput-{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--model-dir", str(model_dir),
           "--adapter-dir", str(adapter_dir), "--calls", str(calls), "--result", str(result_path)]
    _run_logged(cmd, work / f"throughput-{name}.log", dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    return json.loads(result_path.read_text())


def rl_summary(rows: list[dict]) -> dict:
    """Medians over the rollouts of a demo run's metrics.jsonl (eval seconds taken out of the step)."""
    steps = [r for r in rows if r.get(STEP_KEY, -1) >= 0 and "perf/step_seconds" in r]
    if not steps:
        raise SystemExit("metrics.jsonl holds no rollout with perf/step_seconds")

    def eval_seconds(row: dict) -> float:
        return sum(v for k, v in row.items() if k.startswith("perf/eval_") and k.endswith("_seconds") and v)

    return {"step_seconds": statistics.median(r["perf/step_seconds"] - eval_seconds(r) for r in steps),
            "rollout_seconds": statistics.median(r["perf/rollout_seconds"] for r in steps),
            "train_seconds": statistics.median(r["perf/train_seconds"] for r in steps),
            "peak_rss_gib": max(r["mem/peak_rss_gib"] for r in steps),
            "rollouts": len(steps)}


def measure_rl(name: str, work: Path, rollouts: int) -> dict:
    out = work / f"rl-{name}"
    env = dict(os.environ, NUM_ROLLOUT=str(rollouts), EVAL_INTERVAL="100", OUT=str(out))
    out.mkdir(parents=True, exist_ok=True)
    _run_logged(["bash", str(DEMO), "--rollout-engine", name], work / f"rl-{name}.log", env)
    return rl_summary(read_metrics(out / METRICS_FILE))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(results: dict[str, dict[str, dict]]) -> list[list[str]]:
    """One row per measured quantity: label, hf, vllm, vllm/hf.  ``results[engine][part][key]``;
    a missing engine, part or key shows as ``-``."""
    rows = []
    for label, part, key, spec in ROWS:
        values = [results.get(e, {}).get(part, {}).get(key) for e in ENGINES]
        if all(v is None for v in values):
            continue
        hf, vllm = values
        ratio = vllm / hf if hf and vllm is not None else None
        rows.append([label, _fmt(hf, spec), _fmt(vllm, spec), _fmt(ratio, ".2f")])
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    header = ["", LABELS["hf"], LABELS["vllm"], "vLLM / built-in"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def report(rows: list[list[str]], command: str, wall_seconds: float, machine: str, date: str) -> str:
    return "\n".join([
        "# Rollout engines: built-in (hf) vs vLLM", "",
        f"Date: {date}. Machine: {machine}. Command: `{command}` ({wall_seconds:.0f} s).", "",
        markdown_table(rows), "",
        f"Throughput: {len(PAIRS) * SAMPLES} requests x {MAX_NEW_TOKENS} new tokens ({len(PAIRS)} chat prompts x "
        f"{SAMPLES} samples, T=1, fixed seed, no early stop), fp32, each engine in its own child process; the "
        f"adapter is rank {LORA_R}, alpha {LORA_ALPHA}, random B, on every linear module. RL: the demo script, "
        "median over its rollouts. Wall times compare only within one run on one machine.", ""])


def make_adapter(model_dir: Path, out: Path) -> Path:
    from tests._support.adapters import peft_adapter_with_random_b

    model = peft_adapter_with_random_b(model_dir, out, r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear")
    del model
    gc.collect()
    return out


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--skip-rl", action="store_true", help="part 1 only: no demo runs")
    p.add_argument("--rollouts", type=int, default=3, help="NUM_ROLLOUT of each demo run (default 3)")
    p.add_argument("--calls", type=int, default=3, help="timed generate calls per setting (default 3)")
    p.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--adapter-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_cli(argv)
    if args.child:
        write_text_atomically(args.result, json.dumps(run_child(args.child, args.model_dir, args.adapter_dir,
                                                                args.calls)))
        return
    from slime.utils.model_prep import prepare_model

    wall_start = time.perf_counter()
    command = shlex.join([".venv/bin/python", "benchmarks/engines.py", *(sys.argv[1:] if argv is None else argv)])
    model_dir = prepare_model(MODEL_NAME)
    results: dict[str, dict[str, dict]] = {e: {} for e in args.engines}
    work = Path(tempfile.mkdtemp(prefix="engines-bench-"))  # kept: the children's logs and the demo runs
    print(f"logs and demo outputs under {work}", flush=True)
    adapter_dir = make_adapter(model_dir, work / "adapter")
    for name in args.engines:
        print(f"throughput: {name} ...", flush=True)
        results[name]["throughput"] = measure_throughput(name, model_dir, adapter_dir, work, args.calls)
    for name in [] if args.skip_rl else args.engines:
        print(f"RL demo, {args.rollouts} rollouts: {name} ...", flush=True)
        results[name]["rl"] = measure_rl(name, work, args.rollouts)
    wall = time.perf_counter() - wall_start
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    text = report(table_rows(results), command, wall, machine_line(), date)
    print(text)
    print(json.dumps(results, indent=1))
    if args.out:
        write_text_atomically(args.out, text)


if __name__ == "__main__":
    main()
