"""LoRA vs full fine-tuning of the same megatron-core model on the CPU: time, memory, state.

Each variant trains in a fresh child process (so peak RSS and allocator state are its own):

* ``full``: every parameter trainable, AdamW (torch's fused kernel, as the trainer uses) over all of them;
* ``lora``: ``--use-lora`` with rank ``r`` on ``linear_qkv linear_proj linear_fc1 linear_fc2``;
  by default at micro-batch 2 with ``--lora-recompute-input``, i.e. the memory LoRA frees spent
  on a larger micro-batch (the issue leaves micro-batching to us as long as both targets hold);
* ``full mb2`` (when the micro-batches differ): full at LoRA's micro-batch, so the table also
  shows the ratio at equal micro-batch.

Model: SmolLM2-135M's shape (Llama, 30 layers, hidden 576, 9 heads / 3 KV heads, head_dim 64,
FFN 1536, vocab 49152, tied embeddings), random weights, fp32.  One optimizer step consumes
``batch x seq`` tokens, split into micro-batches of ``micro_batch`` samples whose gradients
accumulate (loss of micro-batch ``m`` scaled by ``|m| / batch``, so the step's gradient is the
batch mean whatever the split).

Measured per variant:

* seconds per optimizer step: median over ``--steps`` timed steps after ``--warmup`` steps,
  split into forward / backward / optimizer (summed over micro-batches);
* peak RSS: ``VmHWM`` of the child from ``/proc/self/status`` (whole run, model build included);
* state bytes: unique storages of parameters + gradients + optimizer state, counted after a step;
* activation bytes: unique non-parameter storages packed by autograd during one micro-batch's
  forward (``torch.autograd.graph.saved_tensors_hooks``), i.e. what backward keeps alive.

Run:  ``python benchmarks/lora_vs_full.py``  (``--help`` for the knobs).  It takes 21 training
steps plus three model builds; wall times are only meaningful on an otherwise idle machine, so
the CPU seconds per step (``cpu s``, process time of all threads) are reported next to them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slime.utils.allocator import CHOICES, allocator_env  # imports only the stdlib
from slime.utils.atomic import write_json_atomically  # stdlib only too

REPO = Path(__file__).resolve().parents[1]

SMOLLM2_135M: dict = {
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
LORA_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
# glibc gives freed memory back to the OS only above these sizes/thresholds; these
# values make large activation buffers mmap'd (returned on free) and trim eagerly.
RETURN_MEMORY_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


@dataclass
class Result:
    """One child's measurements (bytes and seconds)."""

    variant: str
    micro_batch: int
    recompute: bool
    recompute_input: bool
    malloc_env: dict
    allocator: str
    optimizer: str
    step_s: float
    forward_s: float
    backward_s: float
    optimizer_s: float
    cpu_s: float
    step_times: list = field(default_factory=list)
    peak_rss: int = 0
    state_bytes: int = 0
    param_bytes: int = 0
    grad_bytes: int = 0
    optim_bytes: int = 0
    activation_bytes: int = 0
    trainable_params: int = 0
    final_loss: float = 0.0


# ----------------------------------------------------------------------------- child side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_bytes() -> int:
    """``VmHWM`` (the kernel's high-water mark of resident memory) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied weights count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _state_bytes(model, optimizer) -> tuple[int, int, int]:
    """(params, grads, optimizer state) bytes of the live tensors."""
    params = [p for chunk in model for p in chunk.parameters()]
    grads = [p.grad for p in params if p.grad is not None]
    states = [v for st in optimizer.optimizer.state.values() for v in st.values()
              if hasattr(v, "untyped_storage") and v.dim() > 0]
    return _storage_bytes(params), _storage_bytes(grads), _storage_bytes(states)


class SavedActivations:
    """Sums the distinct non-parameter storages autograd saves while the context is active.

    The pack hook returns the tensor itself, so memory and results are exactly as without it.
    """

    def __init__(self, model) -> None:
        import torch

        self._params = {p.untyped_storage().data_ptr() for chunk in model for p in chunk.parameters()}
        self._saved: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self._params:
            self._saved[s.data_ptr()] = s.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._saved.values())

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _positions(tokens):
    import torch

    return torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)


def _train_step(model, optimizer, tokens, micro_batch: int,
                saved: SavedActivations | None = None) -> tuple[float, float, float, float]:
    """One optimizer step over ``tokens [b, s]``; returns (loss, fwd s, bwd s, optimizer s).

    ``saved``, when given, watches the first micro-batch's forward.
    """
    fwd = bwd = 0.0
    total = 0.0
    optimizer.zero_grad()
    for i, chunk in enumerate(tokens.split(micro_batch)):
        t0 = time.perf_counter()
        with saved if saved is not None and i == 0 else contextlib.nullcontext():
            loss = model[0](chunk, _positions(chunk), None, labels=chunk).mean() * (chunk.shape[0] / tokens.shape[0])
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        fwd, bwd, total = fwd + t1 - t0, bwd + t2 - t1, total + loss.item()
    t3 = time.perf_counter()
    optimizer.step()
    return total, fwd, bwd, time.perf_counter() - t3


def run_child(opts: argparse.Namespace) -> Result:
    """Build the model for ``opts.child`` and measure it (runs inside the child process)."""
    import torch

    torch.set_num_threads(opts.threads)
    from slime.backends.megatron_utils.arch import ModelArch
    from slime.backends.megatron_utils.model import initialize_model_and_optimizer
    from slime.backends.megatron_utils.parallel import destroy_parallel, init_parallel
    from slime.utils.allocator import active_allocator
    from slime.utils.arguments import parse_args

    init_parallel(0, 1, master_port=_free_port(), seed=opts.seed)
    flags = ["--lr", "1e-4", "--seed", str(opts.seed), "--micro-batch-size", str(opts.micro_batch)]
    if opts.recompute:
        flags.append("--recompute-activations")
    if opts.child == "lora":
        flags += ["--use-lora", "--lora-r", str(opts.rank), "--lora-alpha", str(2 * opts.rank),
                  "--lora-target-modules", *LORA_TARGETS]
        if opts.lora_recompute_input:
            flags.append("--lora-recompute-input")
    args = parse_args(flags)
    built = initialize_model_and_optimizer(args, arch=ModelArch.from_hf_config(SMOLLM2_135M))
    model, optimizer = built.model, built.optimizer
    for chunk in model:
        chunk.train()
    gen = torch.Generator().manual_seed(opts.seed)
    tokens = torch.randint(0, SMOLLM2_135M["vocab_size"], (opts.batch, opts.seq), generator=gen)

    saved = SavedActivations(model)
    timings = []
    for i in range(opts.warmup + opts.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss, fwd, bwd, opt = _train_step(model, optimizer, tokens, opts.micro_batch, saved if i == 0 else None)
        timings.append((time.perf_counter() - t0, fwd, bwd, opt, time.process_time() - c0))
        if i == 0:  # grads and Adam moments all exist now
            params, grads, states = _state_bytes(model, optimizer)
    timed = timings[opts.warmup:]
    median = lambda k: statistics.median(t[k] for t in timed)  # noqa: E731
    result = Result(
        variant=opts.child, micro_batch=opts.micro_batch, recompute=opts.recompute,
        recompute_input=opts.child == "lora" and opts.lora_recompute_input,
        malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        allocator=active_allocator(),
        optimizer="fused AdamW" if optimizer.optimizer.defaults.get("fused") else "AdamW (per-tensor loop)",
        step_s=median(0), forward_s=median(1), backward_s=median(2), optimizer_s=median(3), cpu_s=median(4),
        step_times=[round(t[0], 4) for t in timed], peak_rss=_peak_rss_bytes(),
        state_bytes=params + grads + states, param_bytes=params, grad_bytes=grads, optim_bytes=states,
        activation_bytes=saved.nbytes, trainable_params=sum(p.numel() for p in optimizer.params),
        final_loss=loss,
    )
    destroy_parallel()
    return result


# ----------------------------------------------------------------------------- parent side


def _child_command(opts: argparse.Namespace, variant: str, micro_batch: int, recompute: bool) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--micro-batch", str(micro_batch),
           "--batch", str(opts.batch), "--seq", str(opts.seq), "--rank", str(opts.rank), "--threads",
           str(opts.threads), "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--seed", str(opts.seed)]
    cmd += ["--recompute"] if recompute else []
    return cmd + (["--lora-recompute-input"] if variant == "lora" and opts.lora_recompute_input else [])


def spawn(opts: argparse.Namespace, variant: str, micro_batch: int | None = None) -> Result:
    """Run one variant in a fresh interpreter and parse the JSON line it prints last."""
    is_lora = variant == "lora"
    micro_batch = micro_batch or (opts.lora_micro_batch if is_lora and opts.lora_micro_batch else opts.micro_batch)
    recompute = opts.recompute in ("both", variant)
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), PYTHONWARNINGS="ignore")
    env.update(allocator_env(opts.allocator))
    if opts.return_memory in ("both", variant):
        env.update(RETURN_MEMORY_ENV)
    proc = subprocess.run(_child_command(opts, variant, micro_batch, recompute), env=env, cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{variant} child failed with exit status {proc.returncode}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    return Result(**json.loads(last))


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f}"


def format_table(full: Result, lora: Result, reference: Result | None = None) -> str:
    """Rows full / lora / ratio (+ full at LoRA's micro-batch and LoRA's ratio to it); GiB and seconds."""
    cols = [("step s", "step_s", "{:.3f}"), ("fwd s", "forward_s", "{:.3f}"), ("bwd s", "backward_s", "{:.3f}"),
            ("optim s", "optimizer_s", "{:.3f}"), ("cpu s", "cpu_s", "{:.2f}"), ("RSS GiB", "peak_rss", None),
            ("state GiB", "state_bytes", None), ("act GiB/mb", "activation_bytes", None)]

    def row(label: str, cells: list[str]) -> str:
        return f"{label:<10}" + "".join(f"{c:>13}" for c in cells)

    def values(r: Result) -> list[str]:
        return [fmt.format(getattr(r, key)) if fmt else _gib(getattr(r, key)) for _, key, fmt in cols]

    def ratios(base: Result) -> list[str]:
        return [f"{getattr(lora, key) / getattr(base, key):.3f}" for _, key, _ in cols]

    lines = [row("", [name for name, _, _ in cols]), row("full", values(full)), row("lora", values(lora)),
             row("ratio", ratios(full))]
    if reference is not None:
        lines += [row(f"full mb{reference.micro_batch}", values(reference)), row("ratio", ratios(reference))]
    return "\n".join(lines)


TARGETS = {"step_s": 0.75, "peak_rss": 0.50, "state_bytes": 0.30}


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8, help="samples per optimizer step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sample")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per forward/backward (full; LoRA too "
                   "with --lora-micro-batch 0)")
    p.add_argument("--lora-micro-batch", type=int, default=2, help="samples per forward/backward of LoRA "
                   "(0: same as --micro-batch)")
    p.add_argument("--lora-recompute-input", action=argparse.BooleanOptionalAction, default=True,
                   help="LoRA child runs with --lora-recompute-input (adapter inputs recomputed in backward)")
    p.add_argument("--equal-micro-batch-reference", action=argparse.BooleanOptionalAction, default=True,
                   help="when the micro-batches differ, also train full at LoRA's micro-batch and print that ratio")
    p.add_argument("--recompute", choices=["none", "lora", "full", "both"], default="none",
                   help="which variants run with --recompute-activations")
    p.add_argument("--return-memory", choices=["none", "lora", "full", "both"], default="none",
                   help=f"which variants run with glibc tunables {RETURN_MEMORY_ENV}")
    p.add_argument("--allocator", choices=CHOICES, default="auto",
                   help="malloc of both children (train.py's --allocator): auto = tcmalloc when installed")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = 2r)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", type=str, default=None, help="also write both results to this JSON file")
    p.add_argument("--child", choices=["full", "lora"], default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.batch % opts.micro_batch or (opts.lora_micro_batch and opts.batch % opts.lora_micro_batch):
        p.error("--batch must be a multiple of --micro-batch and --lora-micro-batch")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        child_parser = argparse.ArgumentParser()
        for name, kind in (("--child", str), ("--micro-batch", int), ("--batch", int), ("--seq", int),
                           ("--rank", int), ("--threads", int), ("--steps", int), ("--warmup", int), ("--seed", int)):
            child_parser.add_argument(name, type=kind, required=True)
        child_parser.add_argument("--recompute", action="store_true")
        child_parser.add_argument("--lora-recompute-input", action="store_true")
        print(json.dumps(asdict(run_child(child_parser.parse_args(argv)))), flush=True)
        return 0
    opts = parse_cli(argv)
    started = time.perf_counter()
    full = spawn(opts, "full")
    lora = spawn(opts, "lora")
    reference = None
    if opts.equal_micro_batch_reference and lora.micro_batch != full.micro_batch:
        reference = spawn(opts, "full", micro_batch=lora.micro_batch)
    print(format_table(full, lora, reference))
    for key, limit in TARGETS.items():
        ratio = getattr(lora, key) / getattr(full, key)
        print(f"target {key}: lora/full = {ratio:.3f} (<= {limit}: {'met' if ratio <= limit else 'MISSED'})")
    if reference is not None:
        print(f"at equal micro-batch {reference.micro_batch}: lora/full step {lora.step_s / reference.step_s:.3f}, "
              f"peak RSS {lora.peak_rss / reference.peak_rss:.3f}")
    print(f"step times (s): full {full.step_times}  lora {lora.step_times}")
    print(f"trainable params: full {full.trainable_params:,}  lora {lora.trainable_params:,}")
    print(f"malloc: full {full.allocator}  lora {lora.allocator}; optimizer: full {full.optimizer}  lora {lora.optimizer}")
    print(f"micro-batch: full {full.micro_batch}  lora {lora.micro_batch}; recompute: full {full.recompute}  "
          f"lora {lora.recompute}; lora input recompute: {lora.recompute_input}; malloc env: full {full.malloc_env or '-'}  lora {lora.malloc_env or '-'}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"benchmark wall time: {time.perf_counter() - started:.0f} s")
    if opts.json:
        results = {"full": asdict(full), "lora": asdict(lora)}
        if reference is not None:
            results["full_at_lora_micro_batch"] = asdict(reference)
        write_json_atomically(opts.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
