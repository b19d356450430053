"""Checkpoints of a several-adapter run (``--lora-tasks``): every task's adapter, AdamW state and LR
step come back exactly, each task's newest adapter is a PEFT directory peft loads alone, and a resume
with other tasks is a one-line UserError naming ``--lora-tasks``.

A tiny Llama (real megatron-core, TP=1 in this process) with two tasks of different r and alpha;
``add`` takes two optimizer steps and ``mul`` one (so their AdamW states and LR steps differ), each
through its own adapter and optimizer, as the trainer does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests._support.logprobs import megatron_logprobs, peft_logprobs
from tests._support.numerics import assert_close

TASKS = [{"name": "add", "r": 4, "lora_alpha": 8}, {"name": "mul", "r": 8, "lora_alpha": 4}]
EXTRA = {"rollout": {"add": {"epoch": 0, "offset": 6}, "mul": {"epoch": 1, "offset": 2}}}
TOKENS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]])


def _tasks_file(root: Path, name: str, tasks: list[dict]) -> Path:
    path = root / f"{name}.json"
    entries = []
    for task in tasks:
        prompts = root / f"{task['name']}.jsonl"
        prompts.write_text(json.dumps({"prompt": "1+1=", "label": "2"}) + "\n")
        entries.append({**task, "prompt_data": str(prompts)})
    path.write_text(json.dumps({"tasks": entries}))
    return path


def _build(base: Path, tasks_file: Path | None):
    from slime.backends.megatron_utils.model import initialize_model_and_optimizer
    from slime.utils.arguments import parse_args

    flags = ["--hf-checkpoint", str(base), "--use-lora", "--lr", "2e-2", "--lr-warmup-iters", "2", "--seed", "3"]
    args = parse_args(flags + (["--lora-tasks", str(tasks_file)] if tasks_file else []))
    return args, initialize_model_and_optimizer(args)


def _step(built, task: str) -> float:
    """One optimizer step of ``task``'s adapter on a batch drawn from the torch RNG."""
    from slime_plugins.lora.lora_layer import use_adapter

    model, opt = built.model[0], built.optimizers[task]
    model.train()
    ids = torch.randint(0, built.arch.vocab_size, (2, 8))
    pos = torch.arange(8).expand(2, -1)
    opt.zero_grad()
    with use_adapter(built.model, task):
        loss = model(ids[:, :-1], pos[:, :-1], None, labels=ids[:, 1:]).float().mean()
        loss.backward()
    opt.step()
    return loss.item()


def _snapshot(built) -> dict:
    """Every adapter tensor, every AdamW state tensor and every LR step, by name."""
    from slime_plugins.lora.lora_layer import adapter_parameters

    out = {}
    for task, opt in built.optimizers.items():
        for index, param in enumerate(adapter_parameters(built.model, task)):
            out[f"{task}/param{index}"] = param.detach().clone()
            for key, value in opt.optimizer.state.get(param, {}).items():
                out[f"{task}/param{index}/{key}"] = value.detach().clone()
        out[f"{task}/step_count"] = opt.step_count
    return out


def _user_error(fn) -> str:
    from slime.utils.errors import UserError

    with pytest.raises(UserError) as info:
        fn()
    return str(info.value)


@pytest.fixture(scope="module")
def run(tmp_path_factory, single_process):
    """Train both tasks, save iteration 2 (then one more ``mul`` step: the uninterrupted step 3)."""
    from slime.backends.megatron_utils.checkpoint import save_checkpoint
    from tests._support.tiny_models import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpt_tasks")
    base = make_tiny_checkpoint(root, family="llama", seed=0)
    tasks_file = _tasks_file(root, "tasks", TASKS)
    torch.manual_seed(0)
    args, built = _build(base, tasks_file)
    for task in ("add", "mul", "add"):
        _step(built, task)
    save_checkpoint(root / "save", 2, built.model, built.arch, args, built.optimizers, EXTRA)
    saved = _snapshot(built)
    step3 = _step(built, "mul")
    return {"root": root, "base": base, "tasks_file": tasks_file, "saved": saved, "step3": step3,
            "after_step3": _snapshot(built)}


def test_layout_has_a_peft_dir_and_link_per_task(run):
    save = run["root"] / "save"
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2\n"
    assert {p.name for p in save.iterdir()} == {"latest_checkpointed_iteration.txt", "iter_0000002", "add", "mul"}
    for task in TASKS:
        assert os.readlink(save / task["name"]) == f"iter_0000002/{task['name']}"
        config = json.loads((save / task["name"] / "adapter" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (task["r"], task["lora_alpha"])
    meta = json.loads((save / "iter_0000002" / "checkpoint.json").read_text())
    assert meta["tasks"] == [{"name": "add", "r": 4, "alpha": 8.0}, {"name": "mul", "r": 8, "alpha": 4.0}]
    assert {"add/adapter/adapter_model.safetensors", "mul/adapter/adapter_model.safetensors",
            "trainer_state/rank_00000.safetensors"} <= set(meta["files"])
    state = json.loads((save / "iter_0000002" / "trainer_state" / "rank_00000.json").read_text())
    assert {name: s["lr_step"] for name, s in state["optimizers"].items()} == {"add": 2, "mul": 1}


def test_resume_restores_every_adapter_and_optimizer_exactly(run):
    from slime.backends.megatron_utils.checkpoint import load_checkpoint

    torch.manual_seed(99)  # a fresh model in another RNG state: everything must come from the checkpoint
    args, built = _build(run["base"], run["tasks_file"])
    assert _snapshot(built).keys() != run["saved"].keys()  # no AdamW state before the load
    iteration, extra = load_checkpoint(run["root"] / "save", built.model, built.arch, args, built.optimizers)
    assert (iteration, extra) == (2, EXTRA)
    restored = _snapshot(built)
    assert restored.keys() == run["saved"].keys()
    assert restored["add/step_count"] == 2 and restored["mul/step_count"] == 1
    for key, value in run["saved"].items():
        if torch.is_tensor(value):
            assert torch.equal(restored[key], value), key
        else:
            assert restored[key] == value, key
    # The next step (its batch drawn from the restored torch RNG) is the uninterrupted one, bit for bit.
    assert _step(built, "mul") == run["step3"]
    after = _snapshot(built)
    assert all(torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v for k, v in run["after_step3"].items())


def test_each_task_adapter_loads_alone_in_peft(run):
    from slime.backends.megatron_utils.checkpoint import load_checkpoint
    from slime_plugins.lora.lora_layer import use_adapter

    args, built = _build(run["base"], run["tasks_file"])
    load_checkpoint(run["root"] / "save", built.model, built.arch, args, built.optimizers)
    built.model[0].eval()
    outputs = {}
    for task in ("add", "mul"):
        with use_adapter(built.model, task):
            ours = megatron_logprobs(built.model, built.arch, TOKENS)
        theirs = peft_logprobs(run["base"], run["root"] / "save" / task / "adapter", TOKENS)
        assert_close(ours, theirs, atol=1e-4, rtol=0, what=f"task {task}: ours vs peft")
        outputs[task] = theirs
    assert not torch.allclose(outputs["add"], outputs["mul"], atol=1e-4), "the two adapters are not distinct"


@pytest.mark.parametrize("case, tasks, words", [
    ("renamed", [TASKS[0], {**TASKS[1], "name": "times"}], ["'mul' saved but absent", "'times' not saved"]),
    ("rank", [TASKS[0], {**TASKS[1], "r": 4}], ["task 'mul': r 8 saved, 4 now"]),
    ("alpha", [{**TASKS[0], "lora_alpha": 16}, TASKS[1]], ["task 'add': alpha 8.0 saved, 16.0 now"]),
])
def test_resume_with_other_tasks_is_one_line_user_error(run, case, tasks, words):
    from slime.backends.megatron_utils.checkpoint import load_checkpoint, load_dir_problem

    args, built = _build(run["base"], _tasks_file(run["root"], case, tasks))
    save = run["root"] / "save"
    message = _user_error(lambda: load_checkpoint(save, built.model, built.arch, args, built.optimizers))
    assert "\n" not in message and "--lora-tasks" in message, message
    for word in words:
        assert word in message, message
    assert load_dir_problem(save, built.arch, args, world_size=1) == message  # preflight sees it before Ray


def test_resume_without_tasks_is_one_line_user_error(run):
    from slime.backends.megatron_utils.checkpoint import load_checkpoint

    args, built = _build(run["base"], None)
    message = _user_error(lambda: load_checkpoint(run["root"] / "save", built.model, built.arch, args,
                                                  built.optimizer))
    assert "\n" not in message and "saved with --lora-tasks" in message and "add (r=4" in message, message


def test_killed_save_keeps_every_task_link_on_the_previous_iteration(run, monkeypatch):
    from slime.backends.megatron_utils import checkpoint

    class Killed(BaseException):
        pass

    def die() -> None:
        raise Killed

    args, built = _build(run["base"], run["tasks_file"])
    save = run["root"] / "killed"
    shutil.copytree(run["root"] / "save", save, symlinks=True)
    monkeypatch.setattr(checkpoint, "_kill", die)
    monkeypatch.setenv(checkpoint.CRASH_ENV, "rename")  # iter_3 in place, links and latest not yet
    with pytest.raises(Killed):
        checkpoint.save_checkpoint(save, 3, built.model, built.arch, args, built.optimizers, {})
    assert checkpoint.read_latest_iteration(save) == 2
    assert os.readlink(save / "add") == "iter_0000002/add" and os.readlink(save / "mul") == "iter_0000002/mul"
    monkeypatch.delenv(checkpoint.CRASH_ENV)
    checkpoint.save_checkpoint(save, 3, built.model, built.arch, args, built.optimizers, {})
    assert os.readlink(save / "mul") == "iter_0000003/mul" and checkpoint.read_latest_iteration(save) == 3
