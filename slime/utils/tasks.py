"""Several tasks in one run: the ``--lora-tasks FILE`` configuration.

One frozen base, one adapter per task.  The file (YAML or JSON) is a list of tasks, or a mapping
with a ``tasks`` list::

    tasks:
      - name: add                       # the adapter's name: DIR/add/adapter, engine adapter "add"
        prompt_data: data/add_train.jsonl
        rm_type: exact                  # or custom_rm_path: my_rewards.py:score  (default: the flags)
        eval_prompt_data: data/add_eval.jsonl   # or {name: path, ...}; optional
        lr: 1.0e-4                      # optional, default --lr
        r: 16                           # optional, default --lora-r
        lora_alpha: 32                  # optional, default --lora-alpha

:func:`read_tasks` parses and validates the file, collecting every problem; :func:`task_args`
gives the per-task view of the flags (same namespace, the task's files, reward, lr and LoRA
shape), so a task's data, reward and adapter are built by exactly the code a one-task run uses.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slime.utils.errors import UserError
from slime.utils.lora_config import LoraConfig, hparam_errors, is_finite_number

FLAG = "--lora-tasks"
KEYS = ("name", "prompt_data", "rm_type", "custom_rm_path", "eval_prompt_data", "lr", "r", "lora_alpha")
# A directory name under --save, a PEFT adapter name, a vLLM model name (the engine adds "-vN").
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")
# Names the --save layout uses for itself.
RESERVED = frozenset({"adapter", "model", "trainer_state", "default", "policy"})


@dataclass(frozen=True)
class TaskSpec:
    """One task: its prompts, reward and adapter.

    ``eval_prompt_data`` is ``NAME PATH`` pairs flattened, the shape of ``--eval-prompt-data``;
    ``lora`` is the run's :class:`LoraConfig` with the task's ``r`` and ``alpha``.
    """

    name: str
    prompt_data: str
    rm_type: str
    custom_rm_path: str | None
    eval_prompt_data: tuple[str, ...]
    lr: float
    lora: LoraConfig


def _read_file(path: str) -> tuple[Any, list[str]]:
    where = f"{FLAG} {path}"
    file = Path(path)
    if not file.is_file():
        return None, [f"{where}: no such file; write a YAML or JSON list of tasks (see docs/multitask.md)"]
    text = file.read_text(encoding="utf-8", errors="replace")
    try:
        if file.suffix == ".json":
            return json.loads(text), []
        import yaml

        return yaml.safe_load(text), []
    except (ValueError, Exception) as exc:  # json.JSONDecodeError, yaml.YAMLError
        reason = " ".join(str(exc).split())[:200]
        return None, [f"{where}: not valid {'JSON' if file.suffix == '.json' else 'YAML'} ({reason})"]


def _eval_pairs(value: Any, where: str, name: str) -> tuple[tuple[str, ...], list[str]]:
    if value is None:
        return (), []
    if isinstance(value, str):
        return (name, value), []
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return tuple(x for pair in value.items() for x in pair), []
    return (), [f"{where}: eval_prompt_data must be a path or a mapping name -> path"]


def _number(entry: dict, key: str, default: Any, where: str, errors: list[str]) -> Any:
    value = entry.get(key, default)
    if not is_finite_number(value):
        errors.append(f"{where}: {key} must be a number (got {value!r})")
        return default
    return value


def _one_task(entry: Any, index: int, args: argparse.Namespace, base: LoraConfig) -> tuple[TaskSpec | None, list[str]]:
    where = f"{FLAG} {args.lora_tasks}, task {index}"
    if not isinstance(entry, dict):
        return None, [f"{where}: expected a mapping with name and prompt_data, got {type(entry).__name__}"]
    errors = [f"{where}: unknown key '{k}' (known: {', '.join(KEYS)})" for k in entry if k not in KEYS]
    name = entry.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in RESERVED or name.startswith("iter_"):
        errors.append(f"{where}: name {name!r} is not a valid adapter name (a letter, then letters, digits or _, "
                      f"at most 48; not {', '.join(sorted(RESERVED))}, not iter_*)")
        name = f"#{index}"
    else:
        where = f"{FLAG} {args.lora_tasks}, task '{name}'"
    prompt_data = entry.get("prompt_data")
    if not isinstance(prompt_data, str) or not prompt_data:
        errors.append(f"{where}: prompt_data (a jsonl file of prompts) is required")
    custom = entry.get("custom_rm_path", None if "rm_type" in entry else args.custom_rm_path)
    rm_type = entry.get("rm_type", args.rm_type)
    if custom is None and rm_type not in ("math", "exact"):
        errors.append(f"{where}: rm_type '{rm_type}' is unknown; use math or exact, or give custom_rm_path")
    evals, eval_errors = _eval_pairs(entry.get("eval_prompt_data"), where, name)
    errors += eval_errors
    lr = _number(entry, "lr", args.lr, where, errors)
    if is_finite_number(lr) and lr <= 0:
        errors.append(f"{where}: lr must be > 0 (got {lr})")
    r, alpha = entry.get("r", base.r), _number(entry, "lora_alpha", base.alpha, where, errors)
    errors += [f"{where}: {e.replace('--lora-r', 'r').replace('--lora-alpha', 'lora_alpha')}"
               for e in hparam_errors(r, alpha, 0.0)]
    if errors:
        return None, errors
    lora = dataclasses.replace(base, r=r, alpha=float(alpha))
    return TaskSpec(name, prompt_data, rm_type, custom, evals, float(lr), lora), []


def read_tasks(args: argparse.Namespace) -> tuple[list[TaskSpec], list[str]]:
    """The tasks of ``--lora-tasks`` (``[]`` without it) and every problem with them or with the flags
    they replace, each one line naming the file, the task and the fix."""
    if not getattr(args, "lora_tasks", None):
        return [], []
    errors = []
    if not args.use_lora:
        errors.append(f"{FLAG} trains one adapter per task and needs --use-lora; add --use-lora")
    if args.lora_adapter_path:
        errors.append(f"--lora-adapter-path with {FLAG}: every task starts a fresh adapter; drop one of the two")
    if not args.lora_only_trainable:
        errors.append(f"--no-lora-only-trainable with {FLAG}: the tasks share the base, so it must stay frozen; "
                      "drop --no-lora-only-trainable")
    for flag, value in (("--prompt-data", args.prompt_data), ("--eval-prompt-data", args.eval_prompt_data)):
        if value:
            errors.append(f"{flag} with {FLAG}: each task names its own files; move them into {args.lora_tasks}")
    data, read_errors = _read_file(args.lora_tasks)
    if read_errors:
        return [], errors + read_errors
    entries = data.get("tasks") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        return [], errors + [f"{FLAG} {args.lora_tasks}: expected a non-empty list of tasks (or a mapping with one "
                             "under 'tasks')"]
    base = LoraConfig.from_args(argparse.Namespace(**{**vars(args), "use_lora": True}))
    tasks, seen = [], set()
    for index, entry in enumerate(entries):
        task, task_errors = _one_task(entry, index, args, base)
        errors += task_errors
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name in seen:
            errors.append(f"{FLAG} {args.lora_tasks}: task name '{name}' appears twice; names must be unique")
        elif isinstance(name, str):
            seen.add(name)
        if task is not None:
            tasks.append(task)
    return tasks, errors


def load_tasks(args: argparse.Namespace) -> list[TaskSpec]:
    """:func:`read_tasks`, raising one :class:`UserError` with every problem."""
    tasks, errors = read_tasks(args)
    if errors:
        raise UserError("; ".join(errors))
    return tasks


def task_args(args: argparse.Namespace, task: TaskSpec) -> argparse.Namespace:
    """The flags as a one-task run of ``task`` would have them (a shallow copy; ``args`` is unchanged)."""
    view = copy.copy(args)
    view.prompt_data = task.prompt_data
    view.eval_prompt_data = list(task.eval_prompt_data) or None
    view.rm_type, view.custom_rm_path = task.rm_type, task.custom_rm_path
    view.lr = task.lr
    view.lora_r, view.lora_alpha, view.lora = task.lora.r, task.lora.alpha, task.lora
    view.lora_tasks, view.tasks = None, []
    return view


def max_rank(args: argparse.Namespace) -> int:
    """The largest adapter rank of the run (what a serving engine must accept)."""
    return max([t.lora.r for t in getattr(args, "tasks", None) or []] + [args.lora_r])
