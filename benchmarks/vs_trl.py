"""This project's LoRA GRPO demo vs TRL 1.16 ``GRPOTrainer`` + peft on the same task, same machine.

Both systems train SmolLM2-135M-Instruct (``tools/prepare_model.py``) with LoRA r=16, alpha=32,
dropout 0 on q,k,v,o,gate,up,down, on "What is a + b? Answer with just the number." (a, b in
0..20, ``tools/make_arith_data.py --seed 0``): 8 prompts x 4 samples per step, at most 48 new
tokens, temperature 1.0, lr 1e-4 (constant), reward 1 when the response's final number equals
a + b. Each runs in a fresh child process:

* ours: ``examples/lora/run-smollm2-135m-lora.sh --num-rollout N --eval-interval 7``; its
  ``metrics.jsonl`` gives step times, accuracies and the run's own peak memory;
* TRL: this file with ``--child trl``: ``GRPOConfig``/``GRPOTrainer`` with a peft ``LoraConfig``,
  fp32 on the CPU, no vLLM, TRL's defaults elsewhere; greedy accuracy on the 100 held-out
  prompts before and after training with ``generate`` on the trained peft model.

Measured per system:

* step seconds: median over steps of one generate + train step. Ours: ``perf/step_seconds``
  minus the step's evaluation time; TRL: ``on_step_begin`` -> ``on_step_end``;
* peak memory: the largest sum of RSS over the child and all its descendants, sampled every
  0.2 s by this process (for ours also the run's own ``mem/peak_rss_gib``, which includes Ray);
* accuracy before -> after (greedy, 100 held-out prompts, same scoring);
* training seconds: sum of step times (ours), ``trainer.train()`` wall time (TRL); and the
  training seconds until accuracy first reached 0.69 (ours evaluates every 7 steps, TRL at the end).

Run:  ``python benchmarks/vs_trl.py [--steps 28] [--only ours|trl] [--out DIR]``
(both at 28 steps take ~20-30 minutes on 2 cores; needs ``pip install trl==1.16.0``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slime.rollout.rm import extract_final_number
from slime.utils.atomic import write_text_atomically
from slime.utils.errors import UserError, run_main
from slime.utils.metrics import METRICS_FILE, STEP_KEY, read_metrics

REPO = Path(__file__).resolve().parents[1]

DEMO = REPO / "examples" / "lora" / "run-smollm2-135m-lora.sh"
MODEL_NAME = "smollm2-135m-instruct"
DATA_ARGS = ["--op", "add", "--seed", "0", "--n-train", "2000", "--n-eval", "100"]  # as the demo script

# The task, shared by both systems (the demo script's values).
PROMPTS_PER_STEP = 8
SAMPLES_PER_PROMPT = 4
MAX_NEW_TOKENS = 48
TEMPERATURE = 1.0
LEARNING_RATE = 1e-4
SEED = 1234
LORA_R, LORA_ALPHA = 16, 32
LORA_HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OURS_EVAL_INTERVAL = 7

# Targets for ours relative to TRL, and the absolute accuracy target.
STEP_RATIO_MAX = 0.50
MEMORY_RATIO_MAX = 0.40
# The TRL reference (field notes): 11.0 GiB peak RSS, so the absolute memory target is 4.4 GiB.
# TRL 1.16 here checkpoints gradients by default, which lowers its own peak below that reference.
REFERENCE_TRL_PEAK_GIB = 11.0
ACCURACY_MIN = 0.69
ACCURACY_WITHIN_S = 390.0

SAMPLE_INTERVAL_S = 0.2
GIB = 2**30


@dataclass
class RunResult:
    """One system's measurements; seconds, GiB, accuracies in [0, 1]."""

    system: str
    step_seconds: list[float]
    accuracy_before: float
    accuracy_after: float
    train_seconds: float
    seconds_to_target: float | None = None  # training seconds until accuracy >= ACCURACY_MIN
    peak_rss_gib: float = 0.0  # sampled by the parent over the child's process tree
    own_peak_rss_gib: float | None = None  # what the run itself reported (ours only)
    own_peak_pss_gib: float | None = None  # its PSS sum: shared library pages split, not repeated
    train_reward: list[float] = field(default_factory=list)  # mean reward of each step's samples
    eval_seconds: float = 0.0  # the greedy evaluations, excluded from step and training seconds
    wall_seconds: float = 0.0  # the whole child, model loading and evaluations included
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_seconds) if self.step_seconds else math.nan


# ----------------------------------------------------------------------------- scoring (both systems)


def score(response: str, label: str) -> float:
    """1.0 when the response's final number equals the label's (``--rm-type math``), else 0.0."""
    answer, target = extract_final_number(response), extract_final_number(label)
    return float(answer is not None and target is not None and math.isclose(answer, target, abs_tol=1e-9))


def arith_reward(prompts: list, completions: list, label: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function; conversational prompts give each completion as a message list."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [score(text, lab) for text, lab in zip(texts, label)]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path} not found; run tools/make_arith_data.py --out-dir {path.parent}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def greedy_accuracy(model: Any, tokenizer: Any, rows: list[dict], batch_size: int = 50) -> float:
    """Share of ``rows`` whose greedy completion (<= MAX_NEW_TOKENS tokens) scores 1.

    Prompts are chat-templated with the generation prompt and left-padded, so each batch's
    new tokens start at the same column ``[b, prompt_len:]``.
    """
    import torch

    tokenizer.padding_side = "left"
    model.eval()
    hits = 0.0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id)
        responses = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(score(resp, r["label"]) for resp, r in zip(responses, batch))
    return hits / len(rows)


# ----------------------------------------------------------------------------- TRL (child process)


def trl_config(output_dir: Path, steps: int) -> Any:
    """The GRPOConfig a TRL user would write for this task (TRL defaults for everything else)."""
    from trl import GRPOConfig

    group_batch = PROMPTS_PER_STEP * SAMPLES_PER_PROMPT
    return GRPOConfig(
        output_dir=str(output_dir), max_steps=steps, learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",  # ours keeps the learning rate constant
        per_device_train_batch_size=group_batch, generation_batch_size=group_batch,  # one step per 8x4 batch
        num_generations=SAMPLES_PER_PROMPT, max_completion_length=MAX_NEW_TOKENS, temperature=TEMPERATURE,
        beta=0.0, bf16=False, fp16=False, use_cpu=True, use_vllm=False, seed=SEED,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )


def run_trl_child(model_dir: Path, data_dir: Path, out_dir: Path, steps: int) -> RunResult:
    """Train with TRL in this process; accuracy from ``greedy_accuracy`` before and after."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    train_rows, eval_rows = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "eval.jsonl")
    dataset = Dataset.from_list([{"prompt": r["prompt"], "label": r["label"]} for r in train_rows])
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_HF_TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    step_seconds: list[float] = []

    class StepTimer(TrainerCallback):
        """Seconds from a step's start (generation included) to its optimizer update."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - self.start)

    config = trl_config(out_dir / "trainer", steps)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=arith_reward, args=config, train_dataset=dataset,
                          peft_config=lora, callbacks=[StepTimer()])
    # A separate tokenizer, so left padding for evaluation cannot leak into training.
    eval_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.perf_counter()
    before = greedy_accuracy(trainer.model, eval_tokenizer, eval_rows)  # B = 0: the base model
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    after = greedy_accuracy(trainer.model, eval_tokenizer, eval_rows)
    t3 = time.perf_counter()
    train_seconds = t2 - t1
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    keys = ("gradient_checkpointing", "loss_type", "scale_rewards", "epsilon", "max_grad_norm", "adam_beta2",
            "steps_per_generation", "per_device_train_batch_size", "generation_batch_size")
    return RunResult(system="trl", step_seconds=step_seconds, accuracy_before=before, accuracy_after=after,
                     train_seconds=train_seconds,
                     seconds_to_target=train_seconds if after >= ACCURACY_MIN else None,
                     train_reward=rewards, eval_seconds=(t1 - t0) + (t3 - t2),
                     config={k: getattr(config, k) for k in keys})


# ----------------------------------------------------------------------------- parent side


class TreeRssSampler:
    """Peak of the summed RSS of a process and all its descendants, sampled in a thread.

    A sampled peak is a lower bound of the true one: a spike shorter than the interval can be missed.
    """

    def __init__(self, pid: int, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        import psutil

        self._root = psutil.Process(pid)
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-rss-sampler", daemon=True)
        self.peak_bytes = 0

    def sample(self) -> int:
        """Summed RSS of the tree now; processes that exit mid-sample count as 0."""
        import psutil

        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> "TreeRssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``cmd`` (output to ``log_path``) under a TreeRssSampler; returns (wall seconds, peak GiB)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        with TreeRssSampler(proc.pid) as sampler:
            code = proc.wait()
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        sys.stderr.write(tail)
        raise SystemExit(f"{shlex.join(cmd)} failed with exit status {code}; full log: {log_path}")
    return time.perf_counter() - start, sampler.peak_bytes / GIB


def _child_env() -> dict[str, str]:
    # Offline machine: keep the hub and datasets from reaching for the network.
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONWARNINGS="ignore")


def run_trl(model_dir: Path, data_dir: Path, out_dir: Path, steps: int) -> RunResult:
    """TRL in a fresh interpreter; the child writes its RunResult to ``out_dir/result.json``."""
    result_path = out_dir / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "trl", "--model-dir", str(model_dir),
           "--data-dir", str(data_dir), "--out", str(out_dir), "--steps", str(steps)]
    wall, peak = run_measured(cmd, out_dir / "log.txt", _child_env())
    result = RunResult(**json.loads(result_path.read_text()))
    result.wall_seconds, result.peak_rss_gib = wall, peak
    return result


def ours_from_metrics(rows: list[dict]) -> RunResult:
    """Our RunResult from a run's metrics.jsonl rows (``rollout_id`` -1 is the evaluation before training).

    A step's time is ``perf/step_seconds - perf/eval_arith_seconds``: evaluation is not training.
    """
    by_id: dict[int, dict] = {}
    for row in rows:  # a step may be logged in several rows
        by_id.setdefault(row[STEP_KEY], {}).update(row)
    before = [by_id[-1]] if -1 in by_id else []
    steps = [by_id[i] for i in sorted(by_id) if i >= 0]
    if not before or not steps or steps[-1].get("eval/arith/reward_mean") is None:
        raise UserError("metrics.jsonl lacks the evaluation before or after training; run with --eval-interval")
    step_seconds, elapsed, to_target = [], 0.0, None
    for row in steps:
        step_seconds.append(row["perf/step_seconds"] - (row.get("perf/eval_arith_seconds") or 0.0))
        elapsed += step_seconds[-1]
        if to_target is None and (row.get("eval/arith/reward_mean") or 0.0) >= ACCURACY_MIN:
            to_target = elapsed
    own_peak = max((r["mem/peak_rss_gib"] for r in steps if r.get("mem/peak_rss_gib") is not None), default=None)
    own_pss = max((r["mem/peak_pss_gib"] for r in steps if r.get("mem/peak_pss_gib") is not None), default=None)
    return RunResult(system="ours", step_seconds=step_seconds, accuracy_before=before[0]["eval/arith/reward_mean"],
                     accuracy_after=steps[-1]["eval/arith/reward_mean"], train_seconds=elapsed,
                     seconds_to_target=to_target, own_peak_rss_gib=own_peak, own_peak_pss_gib=own_pss,
                     train_reward=[r["rollout/reward_mean"] for r in steps],
                     eval_seconds=sum(r.get("perf/eval_arith_seconds") or 0.0 for r in [*before, *steps]))


def run_ours(out_dir: Path, steps: int) -> RunResult:
    """The demo script as a user runs it, writing under ``out_dir``."""
    cmd = ["bash", str(DEMO), "--num-rollout", str(steps), "--eval-interval", str(OURS_EVAL_INTERVAL)]
    env = dict(os.environ, OUT=str(out_dir), PYTHON=sys.executable)
    wall, peak = run_measured(cmd, out_dir / "log.txt", env)
    result = ours_from_metrics(read_metrics(out_dir / METRICS_FILE))
    result.wall_seconds, result.peak_rss_gib = wall, peak
    result.config = {"command": shlex.join(cmd), "eval_interval": OURS_EVAL_INTERVAL}
    return result


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _ratio(ours: float | None, trl: float | None) -> float | None:
    return ours / trl if ours is not None and trl else None


def _verdict(text: str, ok: bool | None) -> str:
    return text if ok is None else f"{text} {'met' if ok else 'MISSED'}"


def _row(metric: str, trl: RunResult | None, ours: RunResult | None, attr: str, spec: str,
         ratio: bool = False, target: str = "") -> tuple[str, str, str, str, str]:
    """One table row: ``attr`` of each system, and ours/TRL when ``ratio``."""
    a, b = (None if r is None else getattr(r, attr) for r in (trl, ours))
    return metric, _fmt(a, spec), _fmt(b, spec), _fmt(_ratio(b, a), ".3f") if ratio else "-", target


def report_rows(trl: RunResult | None, ours: RunResult | None) -> list[tuple[str, str, str, str, str]]:
    """(metric, TRL, ours, ours/TRL, target) cells of the comparison table; targets judge ours."""
    both = trl is not None and ours is not None
    step_ok = ours.median_step_s <= STEP_RATIO_MAX * trl.median_step_s if both else None
    mem_ok = ours.peak_rss_gib <= MEMORY_RATIO_MAX * trl.peak_rss_gib if both else None
    acc_ok = None if ours is None else (ours.seconds_to_target or math.inf) <= ACCURACY_WITHIN_S
    n_steps = [None if r is None else float(len(r.step_seconds)) for r in (trl, ours)]
    return [
        _row("median s/step", trl, ours, "median_step_s", ".2f", True,
             _verdict(f"<= {STEP_RATIO_MAX:.2f}x", step_ok)),
        _row("peak RSS GiB (tree, sampled)", trl, ours, "peak_rss_gib", ".2f", True,
             _verdict(f"<= {MEMORY_RATIO_MAX:.2f}x", mem_ok)),
        _row("peak RSS GiB (run's own)", trl, ours, "own_peak_rss_gib", ".2f", target=_verdict(
            f"<= {MEMORY_RATIO_MAX * REFERENCE_TRL_PEAK_GIB:.1f} GiB (issue)",
            None if ours is None or ours.own_peak_rss_gib is None
            else ours.own_peak_rss_gib <= MEMORY_RATIO_MAX * REFERENCE_TRL_PEAK_GIB)),
        _row("peak PSS GiB (run's own)", trl, ours, "own_peak_pss_gib", ".2f"),
        _row("accuracy before", trl, ours, "accuracy_before", ".2f"),
        _row("accuracy after", trl, ours, "accuracy_after", ".2f", target=f">= {ACCURACY_MIN}"),
        _row(f"train s to acc >= {ACCURACY_MIN}", trl, ours, "seconds_to_target", ".0f", True,
             _verdict(f"<= {ACCURACY_WITHIN_S:.0f} s", acc_ok)),
        _row("training s", trl, ours, "train_seconds", ".0f", True),
        _row("evaluation s (excluded)", trl, ours, "eval_seconds", ".0f"),
        _row("child wall s (all)", trl, ours, "wall_seconds", ".0f"),
        ("steps", _fmt(n_steps[0], ".0f"), _fmt(n_steps[1], ".0f"), "-", ""),
    ]


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Fixed-width columns: the metric left-aligned, values right-aligned."""
    header = ("metric", "TRL", "ours", "ours/TRL", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def machine_line() -> str:
    """CPU model, physical/logical cores, memory, Python."""
    import psutil

    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        model = names[0] if names else model
    return (f"{model}, {psutil.cpu_count(logical=False)} cores / {os.cpu_count()} threads, "
            f"{psutil.virtual_memory().total / GIB:.1f} GiB RAM, Python {platform.python_version()}")


def format_report(trl: RunResult | None, ours: RunResult | None, command: str) -> str:
    lines = [format_table(report_rows(trl, ours)), ""]
    for r in (trl, ours):
        if r is not None:
            steps = ", ".join(f"{s:.1f}" for s in r.step_seconds)
            rewards = ", ".join(f"{x:.2f}" for x in r.train_reward)
            lines += [f"{r.system} step seconds: [{steps}]", f"{r.system} train reward per step: [{rewards}]",
                      f"{r.system} config: {json.dumps(r.config, default=str)}"]
    lines += [f"command: {command}", f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
              f"machine: {machine_line()}"]
    return "\n".join(lines)


def prepare_inputs(out: Path) -> tuple[Path, Path]:
    """(model dir, data dir): the offline model and the demo's a+b data under ``out/data``."""
    py = sys.executable
    model = subprocess.run([py, "tools/prepare_model.py", MODEL_NAME], cwd=REPO, check=True, capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
    subprocess.run([py, "tools/make_arith_data.py", "--out-dir", str(out / "data"), *DATA_ARGS], cwd=REPO,
                   check=True, capture_output=True)
    return Path(model), out / "data"


def check_same_data(ours_dir: Path, data_dir: Path) -> None:
    """Both systems must have seen byte-identical prompt files."""
    for name in ("train.jsonl", "eval.jsonl"):
        if (ours_dir / "data" / name).read_bytes() != (data_dir / name).read_bytes():
            raise SystemExit(f"{ours_dir / 'data' / name} differs from {data_dir / name}: the runs used other data")


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=28, help="training steps (rollouts) per system")
    p.add_argument("--only", choices=["ours", "trl"], default=None, help="run one system only")
    p.add_argument("--out", type=Path, default=None, help="output directory (default outputs/vs_trl/<time>)")
    p.add_argument("--child", choices=["trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.steps < 1:
        raise UserError(f"--steps must be >= 1 (got {opts.steps})")
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_cli(argv)
    if opts.child == "trl":
        result = run_trl_child(opts.model_dir, opts.data_dir, opts.out, opts.steps)
        write_text_atomically(opts.out / "result.json", json.dumps(asdict(result), default=str))
        return
    out = opts.out or REPO / "outputs" / "vs_trl" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for system in ("trl", "ours"):
        if (out / system).exists() and opts.only in (None, system):
            raise UserError(f"--out {out}: {out / system} exists from an earlier run; pass a new --out")
    model_dir, data_dir = prepare_inputs(out)
    trl = run_trl(model_dir, data_dir, out / "trl", opts.steps) if opts.only in (None, "trl") else None
    ours = run_ours(out / "ours", opts.steps) if opts.only in (None, "ours") else None
    if ours is not None:
        check_same_data(out / "ours", data_dir)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    report = format_report(trl, ours, command)
    print(report, flush=True)
    write_text_atomically(out / "report.txt", report + "\n")
    write_text_atomically(out / "results.json", json.dumps({r.system: asdict(r) for r in (trl, ours) if r}, indent=2,
                                                           default=str))


if __name__ == "__main__":
    run_main(main)
