"""Every user-facing flag and file of ``train.py``, with bad values: one table (issue 13).

Each row is the flags (and the files they name, written by the row) and the fragments the one
line the run ends with must contain: the flag or the file first, then the fix where the code
gives one.  Every row asserts that

* the error is ONE line naming the flag or file;
* it comes before any training: flags and files fail in ``parse_args`` + ``check_run``, which
  ``train.py`` runs before Ray starts (in this process here; a few rows run the real command line
  and check that Ray never started); rewards fail in the reward path, ``slime/rollout/rm.py``;
* nothing is left half-written: the row's directory is exactly as before (the ``--save`` and
  ``--log-dir`` of every row are fresh paths, created by preflight and removed again).

Rows marked ``xfail(strict=True)`` are bad values the flags do not refuse yet: the reason says the
check ``slime/utils/arguments.py`` needs (strict: the row fails once the check exists, so the mark
is dropped then).  Covered in more depth elsewhere, and not repeated here: read-only output
directories (tests/ray/test_preflight.py, which needs to drop root's capabilities), fuzzed prompt
files and checkpoint files (tests/rollout/test_data_fuzz.py, test_checkpoint_fuzz.py), adapter and
checkpoint errors found while loading tensors (tests/slime_plugins/lora/test_peft_io.py,
tests/backends/megatron_utils/test_checkpoint.py), the vLLM engine's flags.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from slime.ray.preflight import check_run
from slime.rollout.data import Sample
from slime.rollout.rm import batch_rewards, load_reward_fn
from slime.utils.arguments import parse_args
from slime.utils.errors import UserError
from tests._support.tiny_rl import make_tiny_rl_checkpoint

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- the files


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Good inputs, made once: the tiny RL model (4 heads, 2 query groups, 128 positions), a PEFT adapter
    for it (r=4, alpha=8), one made by peft for a model of another shape, and a prompt file."""
    from tests._support.adapters import peft_adapter_with_random_b
    from tests._support.tiny_models import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("world")
    ckpt = make_tiny_rl_checkpoint(root)
    other = make_tiny_checkpoint(root, name="other-shape", intermediate_size=64)
    peft_adapter_with_random_b(ckpt, root / "adapter", r=4, lora_alpha=8)
    peft_adapter_with_random_b(other, root / "foreign-adapter", r=4, lora_alpha=8)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {i}+1?", "label": str(i + 1)}) + "\n" for i in range(8)))
    return {"ckpt": ckpt, "adapter": root / "adapter", "foreign": root / "foreign-adapter", "prompts": prompts}


class Files:
    """What a row builds its bad input from: the good ``world`` and a fresh directory ``tmp``."""

    def __init__(self, world: dict[str, Path], tmp: Path) -> None:
        self.tmp = tmp
        self.ckpt, self.adapter, self.prompts = world["ckpt"], world["adapter"], world["prompts"]
        self.foreign = world["foreign"]

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def jsonl(self, name: str, *rows: Any) -> Path:
        """``rows`` as JSON Lines (a str row is written as it is)."""
        return self.file(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))

    def parquet(self, name: str, columns: dict[str, Any]) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.tmp / name
        pq.write_table(pa.table(columns), path)
        return path

    def _copy(self, source: Path, name: str) -> Path:
        out = self.tmp / name
        shutil.copytree(source, out)
        return out

    def ckpt_with(self, name: str, config: dict | None = None, *, config_bytes: bytes | None = None,
                  remove: tuple[str, ...] = (), cut: str | None = None) -> Path:
        """The model with ``config.json`` edited (``None`` values delete the key) or replaced, files removed,
        or the file ``cut`` truncated to half its size."""
        out = self._copy(self.ckpt, name)
        if config is not None:
            values = json.loads((out / "config.json").read_text())
            values.update(config)
            (out / "config.json").write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
        if config_bytes is not None:
            (out / "config.json").write_bytes(config_bytes)
        for file in remove:
            (out / file).unlink()
        if cut:
            data = (out / cut).read_bytes()
            (out / cut).write_bytes(data[: len(data) // 2])
        return out

    def adapter_with(self, name: str, config: dict | None = None, *, config_bytes: bytes | None = None,
                     weights: Callable[[bytes], bytes] | None = None, remove: tuple[str, ...] = ()) -> Path:
        """The good adapter with ``adapter_config.json`` edited or replaced, the safetensors rewritten."""
        out = self._copy(self.adapter, name)
        if config is not None:
            values = json.loads((out / "adapter_config.json").read_text())
            values.update(config)
            (out / "adapter_config.json").write_text(json.dumps(values))
        if config_bytes is not None:
            (out / "adapter_config.json").write_bytes(config_bytes)
        if weights is not None:
            path = out / "adapter_model.safetensors"
            path.write_bytes(weights(path.read_bytes()))
        for file in remove:
            (out / file).unlink()
        return out

    def checkpoint(self, name: str, *, latest: bytes = b"2\n", meta: dict | None = None,
                   meta_bytes: bytes | None = None, cut: str | None = None, remove: str | None = None) -> Path:
        """A ``--save`` directory of a --use-lora run (r=8, alpha=16, TP=1, one process) at iteration 2, as
        ``load_checkpoint`` reads it: ``meta`` edits ``checkpoint.json``; ``cut`` truncates a listed file."""
        from slime.backends.megatron_utils.arch import ModelArch
        from slime.backends.megatron_utils.checkpoint import FORMAT, FORMAT_VERSION, _lora_flags

        out = self.tmp / name
        iter_dir = out / "iter_0000002"
        files = {"adapter/adapter_model.safetensors": b"\0" * 96, "adapter/adapter_config.json": b"{}",
                 "trainer_state/rank_00000.safetensors": b"\1" * 64, "trainer_state/rank_00000.json": b"{}"}
        for rel, data in files.items():
            self.file(str(iter_dir.relative_to(self.tmp) / rel), data)
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "iteration": 2, "weights": "adapter",
            "model": dataclasses.asdict(ModelArch.from_checkpoint(self.ckpt)),
            "lora": _lora_flags(parse_args(["--use-lora"]).lora),
            "parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "world_size": 1},
            "files": {rel: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for rel, data in files.items()},
        }
        for key, value in (meta or {}).items():
            manifest[key] = {**manifest[key], **value} if isinstance(value, dict) else value
        (iter_dir / "checkpoint.json").write_bytes(meta_bytes if meta_bytes is not None else
                                                   json.dumps(manifest).encode())
        if cut:
            (iter_dir / cut).write_bytes((iter_dir / cut).read_bytes()[:10])
        if remove:
            (iter_dir / remove).unlink()
        (out / "latest_checkpointed_iteration.txt").write_bytes(latest)
        return out


def base_argv(f: Files) -> list[str]:
    """A run that passes every check; a row's flags come after these (argparse: the last one wins)."""
    out = f.tmp / "out"
    return ["--hf-checkpoint", str(f.ckpt), "--prompt-data", str(f.prompts), "--rollout-max-response-len", "12",
            "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--save", str(out / "save"),
            "--log-dir", str(out / "logs")]


def snapshot(directory: Path) -> dict[str, str]:
    """Every path under ``directory`` with its content hash (directories: ``dir``), bytecode caches aside."""
    return {str(p.relative_to(directory)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if "__pycache__" not in p.parts}


def one_line_error(argv: list[str], capsys) -> str:
    """The one line ``train.py`` would end with, from the checks it runs before Ray (in this process)."""
    try:
        check_run(parse_args(argv))
    except UserError as exc:  # run_main prints it as "error: MESSAGE", exit status 2
        message = str(exc)
    except SystemExit as exc:  # argparse: a bad type or choice, an unknown flag, a missing value
        assert exc.code == 2
        out, err = capsys.readouterr()
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        message = err.removeprefix("error: ").rstrip("\n")
    else:
        pytest.fail("the run was accepted")
    assert message and "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------- the table


def row(id: str, flags: Callable[[Files], list], *says: str, needs: str | None = None, marks=()):
    """A row: ``flags(files)`` are the bad flags (writing any file they name), ``says`` what the line contains.
    ``needs``: the check slime/utils/arguments.py lacks (the row is a strict xfail until it exists)."""
    marks = [*marks, pytest.mark.xfail(strict=True, raises=pytest.fail.Exception, reason=f"needs: {needs}")] if needs \
        else list(marks)
    return pytest.param(flags, says, id=id, marks=marks)


def flags(*argv: Any) -> Callable[[Files], list]:
    return lambda f: list(argv)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-core check applies without CUDA")

# Flags whose value is not of the flag's type or choices (argparse, one line, exit status 2).
FLAG_TYPE_ROWS = [
    row("lora-r-not-int", flags("--lora-r", "abc"), "--lora-r", "--help"),
    row("lr-not-float", flags("--lr", "ten"), "--lr"),
    row("tp-not-int", flags("--tensor-model-parallel-size", "1.5"), "--tensor-model-parallel-size"),
    row("reward-timeout-not-float", flags("--reward-timeout", "soon"), "--reward-timeout"),
    row("actor-timeout-not-float", flags("--actor-timeout", "1h"), "--actor-timeout"),
    row("seed-not-int", flags("--seed", "0x10"), "--seed"),
    row("rollout-batch-size-empty", flags("--rollout-batch-size", ""), "--rollout-batch-size"),
    row("num-rollout-not-int", flags("--num-rollout", "many"), "--num-rollout"),
    row("lora-dropout-not-float", flags("--lora-dropout", "half"), "--lora-dropout"),
    row("advantage-estimator-choice", flags("--advantage-estimator", "ppo"), "--advantage-estimator", "grpo"),
    row("kl-loss-type-choice", flags("--kl-loss-type", "k4"), "--kl-loss-type"),
    row("lr-decay-style-choice", flags("--lr-decay-style", "step"), "--lr-decay-style"),
    row("over-long-prompts-choice", flags("--over-long-prompts", "skip"), "--over-long-prompts", "truncate"),
    row("allocator-choice", flags("--allocator", "jemalloc"), "--allocator"),
    row("store-true-with-value", flags("--use-lora=yes"), "--use-lora"),
    row("boolean-optional-with-value", flags("--rollout-merge-lora=no"), "--rollout-merge-lora"),
    row("unknown-flag", flags("--lora-rank", "8"), "--lora-rank"),
    row("missing-value", flags("--lr"), "--lr"),
    row("eval-prompt-data-no-value", flags("--eval-prompt-data"), "--eval-prompt-data"),
]

# Flags of the right type but out of range, or combinations that cannot work (validate_args).
FLAG_RANGE_ROWS = [
    *[row(f"{flag[2:]}-zero", flags(flag, 0), flag, ">= 1") for flag in (
        "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--actor-num-nodes", "--micro-batch-size",
        "--rollout-batch-size", "--rollout-max-response-len", "--n-samples-per-prompt",
        "--n-samples-per-eval-prompt", "--num-rollout", "--num-epoch", "--save-interval", "--eval-interval",
        "--actor-num-gpus-per-node", "--global-batch-size", "--max-tokens-per-micro-batch",
        "--eval-max-response-len")],
    row("rollout-batch-size-negative", flags("--rollout-batch-size", -2), "--rollout-batch-size"),
    row("lr-zero", flags("--lr", 0), "--lr", "positive"),
    row("lr-nan", flags("--lr", "nan"), "--lr"),
    row("lr-inf", flags("--lr", "inf"), "--lr"),
    row("rollout-temperature-zero", flags("--rollout-temperature", 0), "--rollout-temperature", "--eval-temperature 0"),
    row("rollout-top-p-zero", flags("--rollout-top-p", 0), "--rollout-top-p", "(0, 1]"),
    row("rollout-top-p-over-one", flags("--rollout-top-p", 1.5), "--rollout-top-p"),
    row("eval-temperature-negative", flags("--eval-temperature", -1), "--eval-temperature"),
    row("eval-prompt-data-odd", flags("--eval-prompt-data", "arith"), "--eval-prompt-data", "NAME PATH"),
    row("rm-type-unknown", flags("--rm-type", "nope"), "--rm-type", "--custom-rm-path"),
    row("kl-loss-coef-negative", flags("--use-kl-loss", "--kl-loss-coef", -0.1), "--kl-loss-coef"),
    row("check-logprob-gap-negative", flags("--check-logprob-gap", -1), "--check-logprob-gap", "0 disables"),
    row("reward-timeout-negative", flags("--reward-timeout", -1), "--reward-timeout", "0: no limit"),
    row("reward-timeout-nan", flags("--reward-timeout", "nan"), "--reward-timeout"),
    row("actor-timeout-negative", flags("--actor-timeout", -0.5), "--actor-timeout"),
    row("num-rollout-and-num-epoch", flags("--num-rollout", 2, "--num-epoch", 1), "--num-rollout", "--num-epoch"),
    row("lora-r-zero", flags("--use-lora", "--lora-r", 0), "--lora-r"),
    row("lora-alpha-zero", flags("--use-lora", "--lora-alpha", 0), "--lora-alpha"),
    row("lora-dropout-one", flags("--use-lora", "--lora-dropout", 1.0), "--lora-dropout", "[0, 1)"),
    row("lora-target-unknown", flags("--use-lora", "--lora-target-modules", "linear_qkvv"), "--lora-target-modules",
        "'linear_qkvv'"),
    row("lora-recompute-with-dropout", flags("--use-lora", "--lora-recompute-input", "--lora-dropout", 0.1),
        "--lora-recompute-input", "--lora-dropout 0"),
    # Once accepted, and then a crash or a silently wrong run after Ray started:
    row("adam-beta1-one", flags("--adam-beta1", 1.0), "--adam-beta1"),
    row("adam-beta2-negative", flags("--adam-beta2", -0.5), "--adam-beta2"),
    row("adam-eps-negative", flags("--adam-eps", -0.001), "--adam-eps"),
    row("weight-decay-negative", flags("--weight-decay", -0.1), "--weight-decay"),
    row("rollout-num-threads-negative", flags("--rollout-num-threads", -1), "--rollout-num-threads"),
    row("rollout-temperature-nan", flags("--rollout-temperature", "nan"), "--rollout-temperature"),
    row("eval-temperature-nan", flags("--eval-temperature", "nan"), "--eval-temperature"),
    row("actor-timeout-inf", flags("--actor-timeout", "inf"), "--actor-timeout"),
    row("check-logprob-gap-nan", flags("--check-logprob-gap", "nan"), "--check-logprob-gap"),
    row("kl-loss-coef-nan", flags("--use-kl-loss", "--kl-loss-coef", "nan"), "--kl-loss-coef"),
    row("eps-clip-negative", flags("--eps-clip", -0.1), "--eps-clip"),
    row("eps-clip-high-nan", flags("--eps-clip-high", "nan"), "--eps-clip-high"),
    row("min-lr-negative", flags("--lr-decay-style", "cosine", "--lr-decay-iters", 10, "--min-lr", "-0.00001"),
        "--min-lr"),
    row("lr-warmup-iters-negative", flags("--lr-warmup-iters", -1), "--lr-warmup-iters"),
    row("lr-decay-iters-negative", flags("--lr-decay-style", "linear", "--lr-decay-iters", -5), "--lr-decay-iters"),
    row("lr-decay-style-without-iters", flags("--lr-decay-style", "cosine"), "--lr-decay-iters"),
    row("clip-grad-nan", flags("--clip-grad", "nan"), "--clip-grad"),
    row("entropy-coef-nan", flags("--entropy-coef", "nan"), "--entropy-coef"),
    row("seed-too-large", flags("--seed", 2**70), "--seed"),
    row("lora-alpha-inf", flags("--use-lora", "--lora-alpha", "inf"), "--lora-alpha"),
    row("lora-adapter-path-without-use-lora", lambda f: ["--lora-adapter-path", f.adapter], "--lora-adapter-path",
        "--use-lora"),
    row("use-tensorboard-without-log-dir", lambda f: ["--use-tensorboard", "--log-dir", ""], "--use-tensorboard",
        "--log-dir"),
    row("save-interval-without-save", lambda f: ["--save-interval", 2, "--save", ""], "--save-interval", "--save"),
]

CONFIG = "config.json"
# --hf-checkpoint: the model directory, its config.json (structure, types, architecture), weights, tokenizer.
MODEL_ROWS = [
    row("hf-checkpoint-missing", lambda f: ["--hf-checkpoint", f.tmp / "nope"], "--hf-checkpoint", "nope",
        "no config.json"),
    row("hf-checkpoint-is-a-file", lambda f: ["--hf-checkpoint", f.file("model.bin", "x")], "--hf-checkpoint",
        "model.bin"),
    row("hf-checkpoint-without-config", lambda f: ["--hf-checkpoint", f.ckpt_with("noconf", remove=(CONFIG,))],
        "--hf-checkpoint", "noconf", "no config.json"),
    row("config-truncated", lambda f: ["--hf-checkpoint", f.ckpt_with("cut", cut=CONFIG)], f"cut/{CONFIG}",
        "not valid JSON"),
    row("config-not-utf8", lambda f: ["--hf-checkpoint", f.ckpt_with("latin", config_bytes=b'{"a": "caf\xe9"}')],
        f"latin/{CONFIG}", "not valid JSON"),
    row("config-not-an-object", lambda f: ["--hf-checkpoint", f.ckpt_with("list", config_bytes=b"[1, 2]")],
        f"list/{CONFIG}", "--hf-checkpoint"),
    row("config-without-heads", lambda f: ["--hf-checkpoint", f.ckpt_with("noheads", {"num_attention_heads": None})],
        f"noheads/{CONFIG}", "'num_attention_heads'"),
    row("config-heads-a-string", lambda f: ["--hf-checkpoint", f.ckpt_with("strh", {"num_attention_heads": "four"})],
        f"strh/{CONFIG}", "num_attention_heads is 'four'"),
    row("config-heads-zero", lambda f: ["--hf-checkpoint", f.ckpt_with("zeroh", {"num_attention_heads": 0})],
        f"zeroh/{CONFIG}", "num_attention_heads is 0"),
    row("config-positions-a-string",
        lambda f: ["--hf-checkpoint", f.ckpt_with("strpos", {"max_position_embeddings": "128"})],
        f"strpos/{CONFIG}", "max_position_embeddings"),
    row("config-layers-negative", lambda f: ["--hf-checkpoint", f.ckpt_with("neg", {"num_hidden_layers": -2})],
        f"neg/{CONFIG}", "num_hidden_layers is -2"),
    row("config-rope-scaling-a-string", lambda f: ["--hf-checkpoint", f.ckpt_with("rope", {"rope_scaling": "yarn"})],
        f"rope/{CONFIG}", "--hf-checkpoint"),
    row("unsupported-architecture",
        lambda f: ["--hf-checkpoint", f.ckpt_with("gpt2", {"architectures": ["GPT2LMHeadModel"],
                                                          "model_type": "gpt2"})],
        f"gpt2/{CONFIG}", "'GPT2LMHeadModel' is not supported", "Qwen3ForCausalLM"),
    row("unsupported-model-type",
        lambda f: ["--hf-checkpoint", f.ckpt_with("mamba", {"architectures": None, "model_type": "mamba"})],
        f"mamba/{CONFIG}", "'mamba' is not supported"),
    row("unsupported-rope-scaling",
        lambda f: ["--hf-checkpoint", f.ckpt_with("yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})],
        f"yarn/{CONFIG}", "rope_scaling"),
    row("unsupported-activation", lambda f: ["--hf-checkpoint", f.ckpt_with("gelu", {"hidden_act": "gelu"})],
        f"gelu/{CONFIG}", "hidden_act", "only silu"),
    row("weights-missing", lambda f: ["--hf-checkpoint", f.ckpt_with("noweights", remove=("model.safetensors",))],
        "--hf-checkpoint", "noweights", "model.safetensors"),
    row("weights-truncated", lambda f: ["--hf-checkpoint", f.ckpt_with("cutw", cut="model.safetensors")],
        "cutw/model.safetensors", "truncated"),
    row("tokenizer-missing",
        lambda f: ["--hf-checkpoint", f.ckpt_with("notok", remove=("tokenizer.json", "tokenizer_config.json"))],
        "--hf-checkpoint", "notok", "tokenizer"),
    row("tokenizer-corrupt", lambda f: ["--hf-checkpoint", f.ckpt_with("badtok", cut="tokenizer.json")],
        "--hf-checkpoint", "badtok", "tokenizer"),
    row("chat-template-missing",
        lambda f: ["--hf-checkpoint", f.ckpt_with("nochat", remove=("chat_template.jinja",)), "--apply-chat-template"],
        "--apply-chat-template", "no chat template"),
    row("ref-load-missing", lambda f: ["--ref-load", f.tmp / "ref"], "--ref-load", "no config.json"),
]

ADAPTER = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
LORA = ("--use-lora", "--lora-r", 4, "--lora-alpha", 8)
# --lora-adapter-path: the PEFT directory, its adapter_config.json and safetensors, the base model it was made for.
ADAPTER_ROWS = [
    row("adapter-dir-missing", lambda f: [*LORA, "--lora-adapter-path", f.tmp / "none"], "--lora-adapter-path",
        "none", ADAPTER),
    row("adapter-path-is-a-file", lambda f: [*LORA, "--lora-adapter-path", f.file("a.safetensors", "x")],
        "--lora-adapter-path", "a.safetensors"),
    row("adapter-config-not-json",
        lambda f: [*LORA, "--lora-adapter-path", f.adapter_with("badjson", config_bytes=b"{r: 4")],
        f"badjson/{ADAPTER}", "not valid JSON"),
    row("adapter-config-truncated",
        lambda f: [*LORA, "--lora-adapter-path", f.adapter_with("cutconf", config_bytes=b'{"r": 4, "lora_al')],
        f"cutconf/{ADAPTER}", "not valid JSON"),
    row("adapter-config-not-utf8",
        lambda f: [*LORA, "--lora-adapter-path", f.adapter_with("latin1", config_bytes=b'{"r": 4, "x": "\xe9"}')],
        f"latin1/{ADAPTER}"),
    row("adapter-config-a-list", lambda f: [*LORA, "--lora-adapter-path", f.adapter_with("alist", config_bytes=b"[]")],
        f"alist/{ADAPTER}", "expected a JSON object"),
    row("adapter-config-r-a-string", lambda f: [*LORA, "--lora-adapter-path", f.adapter_with("rstr", {"r": "4"})],
        f"rstr/{ADAPTER}", "'r' (int >= 1)"),
    row("adapter-config-not-lora",
        lambda f: [*LORA, "--lora-adapter-path", f.adapter_with("prefix", {"peft_type": "PREFIX_TUNING"})],
        f"prefix/{ADAPTER}", "peft_type"),
    row("adapter-config-dora", lambda f: [*LORA, "--lora-adapter-path", f.adapter_with("dora", {"use_dora": True})],
        f"dora/{ADAPTER}", "DoRA"),
    row("adapter-weights-missing",
        lambda f: [*LORA, "--lora-adapter-path", f.adapter_with("now", remove=(SAFETENSORS,))],
        f"now/{SAFETENSORS}", "missing"),
    row("adapter-weights-truncated",
        lambda f: [*LORA, "--lora-adapter-path", f.adapter_with("cutw", weights=lambda b: b[: len(b) // 2])],
        f"cutw/{SAFETENSORS}", "truncated"),
    row("adapter-weights-garbage",
        lambda f: [*LORA, "--lora-adapter-path", f.adapter_with("junk", weights=lambda b: b"\xff" * 64)],
        f"junk/{SAFETENSORS}", "corrupt"),
    row("adapter-of-another-base-model", lambda f: [*LORA, "--lora-adapter-path", f.foreign],
        f"foreign-adapter/{SAFETENSORS}", "another base model", "--hf-checkpoint"),
    row("adapter-rank-not-the-flag", lambda f: ["--use-lora", "--lora-r", 8, "--lora-alpha", 8,
                                                "--lora-adapter-path", f.adapter],
        f"adapter/{ADAPTER}", "--lora-r 8", "pass --lora-r 4"),
    row("adapter-alpha-not-the-flag", lambda f: ["--use-lora", "--lora-r", 4, "--lora-adapter-path", f.adapter],
        f"adapter/{ADAPTER}", "--lora-alpha 16", "pass --lora-alpha 8"),
    row("adapter-rslora-not-the-flag",
        lambda f: [*LORA, "--lora-use-rslora", "--lora-adapter-path", f.adapter], f"adapter/{ADAPTER}",
        "--lora-use-rslora"),
]

LATEST = "latest_checkpointed_iteration.txt"
META = "checkpoint.json"
# --load: the latest-iteration file, the checkpoint it names, and its fit with this run.
LOAD_ROWS = [
    row("load-dir-missing", lambda f: ["--use-lora", "--load", f.tmp / "runs"], "--load", LATEST),
    row("load-latest-missing", lambda f: ["--use-lora", "--load", f.file("runs/readme", "x").parent], "--load",
        LATEST),
    row("load-latest-garbled", lambda f: ["--use-lora", "--load", f.checkpoint("garbled", latest=b"two\n")],
        f"garbled/{LATEST}", "'two'", "corrupt"),
    row("load-latest-empty", lambda f: ["--use-lora", "--load", f.checkpoint("empty", latest=b"")],
        f"empty/{LATEST}", "corrupt"),
    row("load-latest-not-utf8", lambda f: ["--use-lora", "--load", f.checkpoint("bytes", latest=b"\xff\xfe2\n")],
        f"bytes/{LATEST}", "corrupt"),
    row("load-latest-names-a-missing-iteration",
        lambda f: ["--use-lora", "--load", f.checkpoint("gone", latest=b"7\n")], f"gone/{LATEST}", "iteration 7",
        "iter_0000007"),
    row("load-manifest-truncated",
        lambda f: ["--use-lora", "--load", f.checkpoint("cutmeta", meta_bytes=b'{"format": "slime-ch')],
        f"cutmeta/iter_0000002/{META}", "corrupt"),
    row("load-manifest-missing", lambda f: ["--use-lora", "--load", f.checkpoint("nometa", remove=META)],
        f"nometa/iter_0000002/{META}", "missing"),
    row("load-manifest-another-format",
        lambda f: ["--use-lora", "--load", f.checkpoint("megatron", meta={"format": "torch_dist"})],
        f"megatron/iter_0000002/{META}", "--load"),
    row("load-another-model", lambda f: ["--use-lora", "--load", f.checkpoint("bigger", meta={"model": {
        "hidden_size": 64}})], f"bigger/iter_0000002/{META}", "different model", "--hf-checkpoint"),
    row("load-another-lora-rank", lambda f: ["--use-lora", "--lora-r", 4, "--load", f.checkpoint("r8")],
        f"r8/iter_0000002/{META}", "--lora-r 8", "resume with --lora-r 8"),
    row("load-without-use-lora", lambda f: ["--load", f.checkpoint("lora")], f"lora/iter_0000002/{META}",
        "--use-lora"),
    row("load-another-tp", lambda f: ["--use-lora", "--load", f.checkpoint("tp2", meta={"parallel": {
        "tensor_model_parallel_size": 2}})], f"tp2/iter_0000002/{META}", "--tensor-model-parallel-size 2"),
    row("load-another-world-size", lambda f: ["--use-lora", "--load", f.checkpoint("dp4", meta={"parallel": {
        "world_size": 4}})], f"dp4/iter_0000002/{META}", "--actor-num-gpus-per-node"),
    row("load-file-truncated",
        lambda f: ["--use-lora", "--load", f.checkpoint("cutstate", cut="trainer_state/rank_00000.safetensors")],
        "cutstate/iter_0000002/trainer_state/rank_00000.safetensors", "truncated"),
    row("load-file-missing",
        lambda f: ["--use-lora", "--load", f.checkpoint("nostate", remove="adapter/adapter_model.safetensors")],
        f"nostate/iter_0000002/adapter/{SAFETENSORS}", "missing"),
]

NOT_UTF8 = b'{"prompt": "what is 1+1?", "label": "2"}\n{"prompt": "caf\xe9", "label": "1"}\n'
# --prompt-data, --eval-prompt-data (jsonl and parquet), and the keys and labels the rows need.
DATA_ROWS = [
    row("prompt-data-missing", lambda f: ["--prompt-data", f.tmp / "none.jsonl"], "--prompt-data", "none.jsonl"),
    row("prompt-data-is-a-directory", lambda f: ["--prompt-data", f.tmp], "--prompt-data"),
    row("prompt-data-not-utf8", lambda f: ["--prompt-data", f.file("latin.jsonl", NOT_UTF8)], "latin.jsonl:2",
        "not UTF-8", "save the file as UTF-8"),
    row("prompt-data-truncated",
        lambda f: ["--prompt-data", f.file("cut.jsonl", NOT_UTF8.replace(b"\xe9", b"e")[:-12])], "cut.jsonl:2",
        "not valid JSON"),
    row("prompt-data-empty", lambda f: ["--prompt-data", f.file("empty.jsonl", "")], "empty.jsonl",
        "holds no prompts"),
    row("prompt-data-blank-lines", lambda f: ["--prompt-data", f.file("blank.jsonl", "\n \n\r\n")], "blank.jsonl",
        "holds no prompts"),
    row("prompt-data-row-not-an-object", lambda f: ["--prompt-data", f.jsonl("list.jsonl", ["what is 1+1?"])],
        "list.jsonl:1", "JSON object"),
    row("prompt-data-no-prompt-field", lambda f: ["--prompt-data", f.jsonl("q.jsonl", {"question": "1+1", "label": 2})],
        "q.jsonl:1", "'prompt'", "--input-key"),
    row("input-key-not-in-file", lambda f: ["--input-key", "question"], "prompts.jsonl:1", "'question'",
        "--input-key"),
    row("metadata-not-an-object",
        lambda f: ["--prompt-data", f.jsonl("meta.jsonl", {"prompt": "1+1", "label": 2, "metadata": "easy"})],
        "meta.jsonl:1", "'metadata'", "JSON object"),
    row("messages-without-apply-chat-template",
        lambda f: ["--prompt-data", f.jsonl("chat.jsonl", {"prompt": [{"role": "user", "content": "1+1"}],
                                                           "label": 2})],
        "chat.jsonl:1", "--apply-chat-template"),
    row("prompt-empty", lambda f: ["--prompt-data", f.jsonl("blankp.jsonl", {"prompt": "", "label": 1})],
        "blankp.jsonl:1", "empty"),
    row("prompt-lone-surrogate", lambda f: ["--prompt-data", f.jsonl("sur.jsonl", '{"prompt": "\\ud800", "label": 1}')],
        "sur.jsonl:1", "surrogate"),
    row("prompt-over-long", lambda f: ["--prompt-data", f.jsonl("long.jsonl", {"prompt": "7" * 200, "label": 7})],
        "long.jsonl:1", "over the limit", "--over-long-prompts drop"),
    row("label-missing-for-math", lambda f: ["--prompt-data", f.jsonl("nolabel.jsonl", {"prompt": "1+1"})],
        "nolabel.jsonl:1", "--rm-type math", "--label-key"),
    row("label-without-a-number", lambda f: ["--prompt-data", f.jsonl("word.jsonl", {"prompt": "1+1", "label": "two"})],
        "word.jsonl:1", "'two'", "--rm-type exact"),
    row("label-missing-for-exact",
        lambda f: ["--rm-type", "exact", "--prompt-data", f.jsonl("nolabel2.jsonl", {"prompt": "say hi"})],
        "nolabel2.jsonl:1", "--rm-type exact", "--label-key"),
    row("label-key-not-in-file", lambda f: ["--label-key", "answer"], "prompts.jsonl:1", "'answer'", "--label-key"),
    row("parquet-corrupt", lambda f: ["--prompt-data", f.file("junk.parquet", b"PAR1 not really")], "junk.parquet",
        "not a readable parquet file"),
    row("parquet-truncated",
        lambda f: ["--prompt-data", f.file("cut.parquet", f.parquet("whole.parquet", {
            "prompt": ["1+1", "2+2"], "label": ["2", "4"]}).read_bytes()[:-40])], "cut.parquet",
        "not a readable parquet file"),
    row("parquet-not-utf8", lambda f: ["--prompt-data", f.parquet("latin.parquet", {"prompt": _binary_strings(
        [b"1+1", b"caf\xe9"]), "label": ["2", "1"]})], "latin.parquet:row 2", "UTF-8"),
    row("parquet-row-without-prompt",
        lambda f: ["--prompt-data", f.parquet("holes.parquet", {"prompt": ["1+1", None], "label": ["2", "4"]})],
        "holes.parquet:row 2", "'prompt'"),
    row("eval-data-missing", lambda f: ["--eval-prompt-data", "arith", f.tmp / "eval.jsonl"], "--eval-prompt-data",
        "eval.jsonl"),
    row("eval-data-not-utf8", lambda f: ["--eval-prompt-data", "arith", f.file("eval.jsonl", NOT_UTF8)],
        "--eval-prompt-data", "eval.jsonl:2", "not UTF-8"),
    row("eval-data-empty", lambda f: ["--eval-prompt-data", "arith", f.file("eval.jsonl", "")],
        "--eval-prompt-data", "eval.jsonl", "holds no prompts"),
    row("eval-data-bad-row", lambda f: ["--eval-prompt-data", "arith", f.jsonl("eval.jsonl", {"q": 1})],
        "eval.jsonl:1", "--input-key"),
    row("eval-prompt-over-the-eval-length",
        lambda f: ["--eval-max-response-len", 40, "--eval-prompt-data", "arith",
                   f.jsonl("eval.jsonl", {"prompt": "7" * 100, "label": 7})],
        "eval.jsonl:1", "--eval-max-response-len"),
    row("eval-length-leaves-no-room", lambda f: ["--eval-max-response-len", 128, "--eval-prompt-data", "a",
                                                 f.prompts], "--eval-max-response-len 128", "lower it"),
    row("response-length-leaves-no-room", flags("--rollout-max-response-len", 200), "--rollout-max-response-len 200",
        "lower it"),
]


def _binary_strings(values: list[bytes]):
    import pyarrow as pa

    return pa.array(values, type=pa.binary()).view(pa.string())  # parquet keeps the bytes unchecked


# Parallel layouts the model or the machine cannot run, and LoRA ranks the model cannot hold.
LAYOUT_ROWS = [
    row("tp-does-not-divide-heads", flags("--tensor-model-parallel-size", 3), "--tensor-model-parallel-size 3",
        "4 attention heads"),
    row("tp-does-not-divide-query-groups", flags("--tensor-model-parallel-size", 4, "--actor-num-gpus-per-node", 4),
        "--tensor-model-parallel-size 4", "2 query groups"),
    row("world-not-a-multiple-of-tp", flags("--tensor-model-parallel-size", 2, "--actor-num-gpus-per-node", 3),
        "--actor-num-gpus-per-node", "TP x PP"),
    row("world-not-a-multiple-of-tp-x-pp",
        flags("--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2, "--actor-num-gpus-per-node", 6),
        "--actor-num-gpus-per-node", "(6)", "(4)"),
    row("pp-does-not-divide-layers", flags("--pipeline-model-parallel-size", 3, "--actor-num-gpus-per-node", 3),
        "--pipeline-model-parallel-size 3", "2 layers"),
    row("more-trainers-than-cores", flags("--actor-num-gpus-per-node", 4096), "--actor-num-gpus-per-node 4096",
        "CPU cores", marks=[NO_CUDA]),
    row("global-batch-does-not-divide-rollout", flags("--global-batch-size", 3), "--global-batch-size 3",
        "--rollout-batch-size x --n-samples-per-prompt"),
    row("global-batch-not-a-multiple-of-dp",
        flags("--actor-num-gpus-per-node", 2, "--rollout-batch-size", 3, "--n-samples-per-prompt", 1),
        "--global-batch-size 3", "data-parallel size (2)"),
    row("lora-rank-above-the-model", flags("--use-lora", "--lora-r", 100), "--lora-r 100", "use --lora-r <= 32"),
]

IMPORT_RAISES = 'raise OSError("no\\njudge")\n'  # a two-line message
RM_LATIN1 = b'x = "caf\xe9"\n'  # not UTF-8: Python refuses the source
# --save / --log-dir that cannot be directories, and --custom-rm-path that cannot be loaded.
OUTPUT_AND_REWARD_FLAG_ROWS = [
    row("save-is-a-file", lambda f: ["--save", f.file("save", "keep me")], "--save", "a file, not a directory"),
    row("log-dir-is-a-file", lambda f: ["--log-dir", f.file("logs", "keep me")], "--log-dir",
        "a file, not a directory"),
    row("save-under-a-file", lambda f: ["--save", f.file("plain", "keep me") / "run"], "--save",
        "is not a directory"),
    row("log-dir-under-a-file", lambda f: ["--log-dir", f.file("plain", "keep me") / "a" / "b"], "--log-dir",
        "is not a directory"),
    row("custom-rm-no-function", flags("--custom-rm-path", "rewards.py"), "--custom-rm-path",
        "module.path:function"),
    row("custom-rm-file-missing", lambda f: ["--custom-rm-path", f"{f.tmp / 'rm.py'}:score"], "--custom-rm-path",
        "rm.py", "not found"),
    row("custom-rm-module-missing", flags("--custom-rm-path", "surely_not_a_module_x:score"), "--custom-rm-path",
        "PYTHONPATH"),
    row("custom-rm-function-missing", lambda f: ["--custom-rm-path", f"{f.file('rm.py', 'x = 1')}:score"],
        "--custom-rm-path", "'score' is not defined"),
    row("custom-rm-not-callable", lambda f: ["--custom-rm-path", f"{f.file('rm.py', 'score = 1')}:score"],
        "--custom-rm-path", "not callable"),
    row("custom-rm-import-raises", lambda f: ["--custom-rm-path", f"{f.file('rm.py', IMPORT_RAISES)}:score"],
        "--custom-rm-path", "importing", "OSError: no judge"),
    row("custom-rm-syntax-error", lambda f: ["--custom-rm-path", f"{f.file('rm.py', 'def score(:')}:score"],
        "--custom-rm-path", "SyntaxError"),
    row("custom-rm-not-utf8", lambda f: ["--custom-rm-path", f"{f.file('rm.py', RM_LATIN1)}:score"],
        "--custom-rm-path", "rm.py"),
]

ROWS = {"flag-type": FLAG_TYPE_ROWS, "flag-range": FLAG_RANGE_ROWS, "model": MODEL_ROWS, "adapter": ADAPTER_ROWS,
        "load": LOAD_ROWS, "data": DATA_ROWS, "layout": LAYOUT_ROWS, "output-reward": OUTPUT_AND_REWARD_FLAG_ROWS}


def _all_rows():
    for kind, rows in ROWS.items():
        for param in rows:
            yield pytest.param(*param.values, id=f"{kind}:{param.id}", marks=param.marks)


@pytest.fixture
def files(world, tmp_path) -> Files:
    return Files(world, tmp_path)


@pytest.mark.parametrize("bad, says", list(_all_rows()))
def test_bad_input_ends_in_one_line_before_ray(files, capsys, monkeypatch, bad, says):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = [str(a) for a in base_argv(files) + bad(files)]
    before = snapshot(files.tmp)
    message = one_line_error(argv, capsys)
    missing = [fragment for fragment in says if fragment not in message]
    assert not missing, f"{missing} not in: {message}"
    assert snapshot(files.tmp) == before, "the failed run left files behind or changed some"


def test_the_good_inputs_pass(files, capsys):
    """The control: every row's files start from these, so a row fails for its own bad value only."""
    rm = files.file("rm.py", "def score(args, sample):\n    return 1.0\n")
    argv = [*base_argv(files), *map(str, LORA), "--lora-adapter-path", str(files.adapter), "--custom-rm-path",
            f"{rm}:score", "--eval-prompt-data", "arith", str(files.prompts)]
    check_run(parse_args(argv))
    check_run(parse_args([*base_argv(files), "--use-lora", "--load", str(files.checkpoint("ok"))]))
    check_run(parse_args([*base_argv(files), "--prompt-data", str(files.parquet("ok.parquet", {
        "prompt": ["1+1", "2+2"], "label": ["2", "4"]}))]))
    assert (files.tmp / "out" / "save").is_dir() and (files.tmp / "out" / "logs").is_dir()


# ------------------------------------------------------------------------------------- rewards

STOP_AND_VALUES = """
import asyncio, threading
STOP = threading.Event()

class Shouting:
    def __repr__(self):
        return "line one\\nline two"
"""

# A --custom-rm-path function that raises, returns a non-number or hangs: one line naming it and the sample.
REWARD_ROWS = [
    pytest.param("def score(args, sample):\n    raise ValueError('judge said no')", 60,
                 ("raised on sample 3", "ValueError: judge said no"), id="raises"),
    pytest.param("def score(args, sample):\n    raise RuntimeError('first\\nsecond\\n')", 60,
                 ("raised on sample 3", "RuntimeError: first second"), id="raises-a-multi-line-message"),
    pytest.param("def score(args, sample):\n    raise KeyError(sample.label)", 0,
                 ("raised on sample 3", "KeyError"), id="raises-without-a-timeout"),
    pytest.param("async def score(args, sample):\n    raise ConnectionError('judge down')", 60,
                 ("raised on sample 3", "ConnectionError: judge down"), id="async-raises"),
    pytest.param("def score(args, sample):\n    return '1.0'", 60, ("returned '1.0' for sample 3", "finite number"),
                 id="returns-a-string"),
    pytest.param("def score(args, sample):\n    return None", 60, ("returned None for sample 3",), id="returns-none"),
    pytest.param("def score(args, sample):\n    return float('nan')", 60, ("returned nan",), id="returns-nan"),
    pytest.param("def score(args, sample):\n    return float('-inf')", 60, ("returned -inf",), id="returns-inf"),
    pytest.param("def score(args, sample):\n    return [1.0]", 60, ("returned [1.0]",), id="returns-a-list"),
    pytest.param("def score(args, sample):\n    return Shouting()", 60, ("returned line one line two",),
                 id="returns-a-multi-line-repr"),
    pytest.param("def score(args, sample):\n    return 'x' * 100_000", 60, ("returned 'xxx", "finite number"),
                 id="returns-a-huge-string"),
    pytest.param("async def score(args, sample):\n    return 'yes'", 60, ("returned 'yes' for sample 3",),
                 id="async-returns-a-string"),
    pytest.param("def score(args, sample):\n    STOP.wait(60)\n    return 1.0", 0.3,
                 ("has not returned for sample 3 after 0.3 s", "--reward-timeout 0.3"), id="hangs"),
    pytest.param("async def score(args, sample):\n    await asyncio.Event().wait()", 0.3,
                 ("has not returned for sample 3 after 0.3 s", "--reward-timeout"), id="async-hangs"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body, timeout, says", REWARD_ROWS)
def test_a_bad_reward_function_ends_in_one_line(tmp_path, body, timeout, says):
    path = tmp_path / "judge.py"
    path.write_text(STOP_AND_VALUES + body + "\n")
    spec = f"{path}:score"
    args = argparse.Namespace(rm_type="math", custom_rm_path=spec, reward_timeout=timeout, label_key="label")
    samples = [Sample(index=3, prompt="q", prompt_token_ids=[1], label="2", response="2")]
    start = time.monotonic()
    try:
        with pytest.raises(UserError) as info:
            asyncio.run(batch_rewards(args, samples))
    finally:
        load_reward_fn(args).fn.__globals__["STOP"].set()
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    assert spec in message, message  # names the function (and so the file)
    missing = [fragment for fragment in says if fragment not in message]
    assert not missing, f"{missing} not in: {message}"
    assert time.monotonic() - start < (timeout or 5) + 5


def test_a_reward_module_that_raises_on_import_fails_before_ray(files, monkeypatch, capsys):
    """--custom-rm-path module.path:function (not a file) whose import raises something other than ImportError."""
    package = files.tmp / "pkg"
    files.file("pkg/judge_raising_x.py", IMPORT_RAISES)
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.delitem(sys.modules, "judge_raising_x", raising=False)
    before = snapshot(files.tmp)
    message = one_line_error([*base_argv(files), "--custom-rm-path", "judge_raising_x:score"], capsys)
    assert message == ("--custom-rm-path judge_raising_x:score: importing module 'judge_raising_x' failed: OSError: "
                       "no judge"), message
    assert snapshot(files.tmp) == before


@pytest.mark.parametrize("rm_type, label, says", [
    ("math", "two", ("sample 3", "--rm-type math", "--rm-type exact")),
    ("math", None, ("sample 3", "--rm-type math")),
    ("exact", None, ("sample 3", "--rm-type exact", "--label-key")),
])
def test_a_built_in_reward_that_cannot_score_a_label_ends_in_one_line(rm_type, label, says):
    """What the start-up checks refuse in a prompt file (DATA_ROWS: label-*), the reward path refuses too."""
    args = argparse.Namespace(rm_type=rm_type, custom_rm_path=None, reward_timeout=60, label_key="label")
    with pytest.raises(UserError) as info:
        asyncio.run(batch_rewards(args, [Sample(index=3, prompt="q", prompt_token_ids=[1], label=label,
                                                response="2")]))
    message = str(info.value)
    assert "\n" not in message and all(fragment in message for fragment in says), message


# ------------------------------------------------------------------------------------- the real command line


def _argv_of(f: Files, kind: str) -> tuple[list[str], str]:
    """The subprocess rows: one bad flag of each sort, one bad file, one bad layout, one bad reward file."""
    if kind == "flag-range":
        return ["--lr", "-1"], "--lr must be a positive number"
    if kind == "flag-type":
        return ["--lora-r", "abc"], "--lora-r"
    if kind == "file":
        bad = f.adapter_with("badjson", config_bytes=b"{r: 4")
        return [*map(str, LORA), "--lora-adapter-path", str(bad)], f"{bad / ADAPTER}: not valid JSON"
    if kind == "layout":
        return ["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3 does not divide"
    if kind == "reward":
        return ["--custom-rm-path", f"{f.tmp / 'judge.py'}:score"], "--custom-rm-path"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["flag-range", "flag-type", "file", "layout", "reward"])
def test_train_py_exits_2_with_one_line_and_no_traceback(files, kind):
    bad, says = _argv_of(files, kind)
    temp = Path(tempfile.mkdtemp(prefix="bi-"))  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": str(temp), "RAY_TMPDIR": str(temp)}
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *base_argv(files), *bad], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, env=env)
        started_ray = [p.name for p in temp.iterdir() if "ray" in p.name]
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], proc.stderr[-4000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert started_ray == []
    assert not (files.tmp / "out").exists()
    assert seconds < 60
