"""What a checkpoint holds besides the weights, and how it is checked: the manifest
(``checkpoint.json``), file records (size + sha256), AdamW state keyed by parameter name, RNG
streams, and the fit of a saved checkpoint with this run's model, LoRA flags, tasks and layout.

:mod:`slime.backends.megatron_utils.checkpoint` writes and reads the directories; this module is
the content.  Optimizer state is keyed by parameter name (``chunk{i}.<dotted name>``), never by
position, so a resume into a freshly built model finds each tensor's state whatever the order.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from slime.backends.megatron_utils.arch import ModelArch
from slime.backends.megatron_utils.optimizer import TrainOptimizer
from slime.backends.megatron_utils.parallel import global_world_size, unwrap_model
from slime.utils.atomic import fsync_path
from slime.utils.errors import UserError, read_json_file
from slime.utils.lora_config import LoraConfig

FORMAT = "slime-checkpoint"
FORMAT_VERSION = 1
META_FILE = "checkpoint.json"
TASKS_FLAG = "--lora-tasks"


# ---------------------------------------------------------------------------------------------
# Files: JSON reads, size + sha256 records
# ---------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    return read_json_file(path, missing=f"{path}: missing; the checkpoint is incomplete, resume from another --load "
                          "directory", corrupt_fix="; the file is corrupt, resume from another checkpoint")


def _file_record(path: Path) -> dict:
    """Size and sha256 of a finished file (fsynced on the way: it is about to become durable)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    fsync_path(path)
    return {"bytes": path.stat().st_size, "sha256": digest}


def _verify_files(iter_dir: Path, records: dict[str, dict], names: Sequence[str], *, hashes: bool = True) -> None:
    """Check ``names`` (relative to ``iter_dir``) against the sizes and hashes recorded at save (``hashes=False``:
    the sizes only, which costs no reading)."""
    for name in names:
        path = iter_dir / name
        expected = records.get(name)
        if expected is None:
            raise UserError(f"{path}: not listed in {iter_dir / META_FILE}; the checkpoint was saved by a "
                            f"different layout (--tensor-model-parallel-size or number of processes)")
        if not path.is_file():
            raise UserError(f"{path}: missing; the checkpoint is incomplete, resume from another checkpoint")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise UserError(f"{path}: truncated ({size} of {expected['bytes']} bytes); resume from another checkpoint")
        if hashes and _file_record(path)["sha256"] != expected["sha256"]:
            raise UserError(f"{path}: corrupt (sha256 differs from {META_FILE}); resume from another checkpoint")


# ---------------------------------------------------------------------------------------------
# What is in a checkpoint: names, optimizer state, RNG state, metadata
# ---------------------------------------------------------------------------------------------

def parameter_names(chunks: Sequence[nn.Module]) -> dict[int, str]:
    """``id(param) -> "chunk{i}.<dotted name>"``: optimizer state is keyed by name, not position.

    The one adapter of a one-task run is named as before adapters had names
    (``...linear_qkv.lora_A``, not ``...linear_qkv.adapters.default.lora_A``): its checkpoints keep
    one format across versions."""
    from slime_plugins.lora.lora_layer import DEFAULT_ADAPTER

    default = f".adapters.{DEFAULT_ADAPTER}."
    names: dict[int, str] = {}
    for index, chunk in enumerate(chunks):
        for name, param in unwrap_model(chunk).named_parameters():
            names.setdefault(id(param), f"chunk{index}.{name.replace(default, '.')}")
    return names


def _optimizer_state(optimizer: TrainOptimizer, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state as ``optim/<name>/<key>`` tensors (exp_avg, exp_avg_sq, step) + JSON scalars."""
    tensors: dict[str, torch.Tensor] = {}
    params: dict[str, list[int]] = {}
    scalars: dict[str, Any] = {}
    for param in optimizer.params:
        name = names[id(param)]
        params[name] = list(param.shape)
        for key, value in optimizer.optimizer.state.get(param, {}).items():
            if torch.is_tensor(value):
                tensors[f"optim/{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    return tensors, {"params": params, "scalars": scalars, "lr_step": optimizer.step_count}


def _restore_optimizer(optimizer: TrainOptimizer, names: dict[int, str], tensors: dict[str, torch.Tensor],
                       state: dict, path: Path) -> None:
    saved: dict[str, list[int]] = state["params"]
    current = {names[id(p)]: list(p.shape) for p in optimizer.params}
    if saved.keys() != current.keys():
        missing, extra = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
        raise UserError(f"{path}: optimizer state is for other trainable parameters (not saved: {missing[:3]}, "
                        f"saved but absent: {extra[:3]}); --use-lora, --lora-target-modules and "
                        f"--lora-only-trainable must match the run that saved it")
    for name, shape in current.items():
        if saved[name] != shape:
            raise UserError(f"{path}: parameter {name} was saved with shape {saved[name]}, this run has {shape}; "
                            f"the model or --lora-r differs from the run that saved it")
    per_param: dict[int, dict[str, Any]] = {}
    for index, param in enumerate(optimizer.params):
        name = names[id(param)]
        entry = {key.rsplit("/", 1)[1]: value for key, value in tensors.items()
                 if key.startswith(f"optim/{name}/")}
        entry.update({key.rsplit("/", 1)[1]: value for key, value in state["scalars"].items()
                      if key.startswith(f"{name}/")})
        if entry:
            per_param[index] = entry
    # torch's own loader moves each tensor to its parameter's device and dtype ("step" stays put).
    groups = optimizer.optimizer.state_dict()["param_groups"]
    optimizer.optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    optimizer.step_count = int(state["lr_step"])


Optimizers = Mapping[str, TrainOptimizer] | TrainOptimizer | None


def optimizer_map(optimizers: Optimizers) -> dict[str, TrainOptimizer]:
    """Adapter name -> optimizer; one bare optimizer is the one-adapter run's (``default``), None is none."""
    if optimizers is None:
        return {}
    if isinstance(optimizers, TrainOptimizer):
        from slime_plugins.lora.lora_layer import DEFAULT_ADAPTER

        return {DEFAULT_ADAPTER: optimizers}
    return dict(optimizers)


def optimizers_state(optimizers: Mapping[str, TrainOptimizer],
                     names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every optimizer's tensors (parameter names are unique across adapters, so one flat dict) and its
    JSON part: ``{"optimizer": ...}`` for the one ``default`` optimizer (the one-task layout, unchanged),
    else ``{"optimizers": {task: ...}}``, each with its own ``lr_step``."""
    from slime_plugins.lora.lora_layer import DEFAULT_ADAPTER

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for name, optimizer in optimizers.items():
        opt_tensors, scalars[name] = _optimizer_state(optimizer, names)
        tensors.update(opt_tensors)
    if list(scalars) == [DEFAULT_ADAPTER]:
        return tensors, {"optimizer": scalars[DEFAULT_ADAPTER]}
    return tensors, {"optimizers": scalars}


def restore_optimizers(optimizers: Mapping[str, TrainOptimizer], names: dict[int, str],
                       tensors: dict[str, torch.Tensor], state: dict, path: Path) -> None:
    """Inverse of :func:`optimizers_state`: each optimizer gets its AdamW state and LR step back."""
    from slime_plugins.lora.lora_layer import DEFAULT_ADAPTER

    saved = state["optimizers"] if "optimizers" in state else {DEFAULT_ADAPTER: state["optimizer"]}
    if saved.keys() != optimizers.keys():
        raise UserError(f"{path}: optimizer state is for adapters {sorted(saved)}, this run trains "
                        f"{sorted(optimizers)}; {TASKS_FLAG} must name the tasks of the run that saved it")
    for name, optimizer in optimizers.items():
        _restore_optimizer(optimizer, names, tensors, saved[name], path)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every generator a training step draws from: torch CPU/CUDA, megatron's tracker, Python, NumPy."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng/torch_cuda"] = torch.cuda.get_rng_state()
    for name, value in get_cuda_rng_tracker().get_states().items():
        if isinstance(value, torch.Generator):  # CUDA-graph-safe trackers keep generators, not states
            value = value.get_state()
        tensors[f"rng/tracker/{name}"] = value.detach().cpu().contiguous()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    scalars = {"python": [version, list(internal), gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, scalars


def _restore_rng(tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(tensors["rng/torch_cpu"])
    if "rng/torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/torch_cuda"])
    tracker = get_cuda_rng_tracker()
    states = tracker.get_states()
    for key, value in tensors.items():
        if key.startswith("rng/tracker/"):
            name = key[len("rng/tracker/"):]
            if isinstance(states.get(name), torch.Generator):
                states[name].set_state(value)
            else:
                states[name] = value
    tracker.set_states(states)
    kind, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, tensors["rng/numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = scalars["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _lora_flags(lora: LoraConfig | None) -> dict | None:
    """The LoRA settings that change the model's function or its parameter shapes, by flag name."""
    if lora is None:
        return None
    return {"lora_r": lora.r, "lora_alpha": float(lora.alpha), "lora_target_modules": lora.targets,
            "lora_use_rslora": lora.use_rslora}


def task_flags(args: argparse.Namespace) -> list[dict] | None:
    """``[{"name", "r", "alpha"}, ...]`` of ``--lora-tasks`` (what shapes and scales each adapter), None without."""
    tasks = getattr(args, "tasks", None) or []
    return [{"name": t.name, "r": t.lora.r, "alpha": float(t.lora.alpha)} for t in tasks] or None


def _describe_tasks(tasks: Any) -> str:
    return ", ".join(f"{t.get('name')} (r={t.get('r')}, alpha={t.get('alpha'):g})" for t in tasks)


def _tasks_difference(saved: list[dict], now: list[dict]) -> str:
    """What differs between two task lists, e.g. ``task 'mul' saved but absent; task 'add': r 4 != 8``."""
    old, new = {t["name"]: t for t in saved}, {t["name"]: t for t in now}
    parts = [f"task '{n}' saved but absent" for n in old if n not in new]
    parts += [f"task '{n}' not saved" for n in new if n not in old]
    for name in (n for n in new if n in old):
        parts += [f"task '{name}': {key} {old[name][key]!r} saved, {new[name][key]!r} now"
                  for key in ("r", "alpha") if old[name][key] != new[name][key]]
    return "; ".join(parts)


def _check_tasks(saved: Any, args: argparse.Namespace, path: Path) -> None:
    """One UserError when the saving run's ``--lora-tasks`` (names, r, alpha) differ from this run's."""
    now = task_flags(args)
    if saved is None and now is None:
        return
    if saved is None:
        raise UserError(f"{path}: checkpoint was saved without {TASKS_FLAG} (one adapter); resume without "
                        f"{TASKS_FLAG}, or --save to a new directory and drop --load")
    if now is None:
        raise UserError(f"{path}: checkpoint was saved with {TASKS_FLAG} (tasks {_describe_tasks(saved)}); "
                        f"resume with that {TASKS_FLAG} file")
    difference = _tasks_difference(saved, now)
    if difference:
        raise UserError(f"{path}: {TASKS_FLAG} differs from the run that saved the checkpoint ({difference}); "
                        f"resume with its tasks: {_describe_tasks(saved)}")


def _parallel_layout(args: argparse.Namespace, world_size: int | None = None) -> dict:
    return {"tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
            "expert_model_parallel_size": args.expert_model_parallel_size,
            "world_size": global_world_size() if world_size is None else world_size}


def _jsonable_args(args: argparse.Namespace) -> dict:
    out = {}
    for key, value in vars(args).items():
        try:
            json.dumps(value)
            out[key] = value
        except (TypeError, ValueError):
            out[key] = str(value)
    return out


def _manifest_problem(meta: dict) -> str | None:
    """What is malformed in a ``checkpoint.json`` of the right format and version, or None."""
    for key, kinds in (("model", dict), ("lora", (dict, type(None))), ("parallel", dict), ("files", dict)):
        if key not in meta:
            return f"'{key}' is missing"
        if not isinstance(meta[key], kinds):
            return f"'{key}' is {type(meta[key]).__name__}, not what this trainer writes"
    for name, record in meta["files"].items():
        if not (isinstance(record, dict) and type(record.get("bytes")) is int
                and type(record.get("sha256")) is str):
            return f"'files' entry {name!r} lacks its bytes and sha256"
    tasks = meta.get("tasks")  # absent: a one-adapter checkpoint
    if tasks is not None and not (isinstance(tasks, list) and tasks and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and type(t.get("r")) is int
            and isinstance(t.get("alpha"), (int, float)) for t in tasks)):
        return "'tasks' is not a list of {name, r, alpha}"
    return None


def _check_compatible(meta: Any, arch: ModelArch, args: argparse.Namespace, path: Path,
                      world_size: int | None = None) -> None:
    """One UserError naming the flag that differs between the saving run and this one (``world_size``: the
    run's number of training processes, by default this process group's)."""
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(meta).__name__}; the file is corrupt, resume "
                        "from another checkpoint")
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} checkpoint (format {meta.get('format')!r}, "
                        f"version {meta.get('version')!r}); point --load at a --save directory of this trainer")
    problem = _manifest_problem(meta)
    if problem:
        raise UserError(f"{path}: {problem}; the file is corrupt, resume from another checkpoint")
    now = dataclasses.asdict(arch)
    diff = [f"{k} {meta['model'].get(k)!r} != {v!r}" for k, v in now.items() if meta["model"].get(k) != v]
    if diff:
        raise UserError(f"{path}: checkpoint is of a different model (saved vs now: {', '.join(diff)}); "
                        f"--hf-checkpoint must be the model the checkpoint was trained from")
    saved_lora, lora = meta["lora"], _lora_flags(args.lora)
    if (saved_lora is None) != (lora is None):
        had = "with" if saved_lora is not None else "without"
        raise UserError(f"{path}: checkpoint was saved {had} --use-lora; resume {had} --use-lora")
    _check_tasks(meta.get("tasks"), args, path)
    per_task = ("lora_r", "lora_alpha") if meta.get("tasks") else ()  # each task's r and alpha: checked above
    for key in (k for k in lora or {} if k not in per_task):
        if saved_lora.get(key) != lora[key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{path}: checkpoint was saved with {flag} {saved_lora.get(key)!r}, this run has "
                            f"{flag} {lora[key]!r}; resume with {flag} {saved_lora.get(key)!r}")
    layout, saved = _parallel_layout(args, world_size), meta["parallel"]
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
        was = saved.get(key, 1)  # checkpoints of dense-only versions have no expert entry
        if was != layout[key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{path}: checkpoint was saved with {flag} {was!r}, this run has "
                            f"{layout[key]}; resume with {flag} {was!r} (resharding optimizer "
                            f"state across parallel sizes is not supported)")
    if saved.get("world_size") != layout["world_size"]:
        raise UserError(f"{path}: checkpoint was saved by {saved.get('world_size')!r} training processes, this "
                        f"run has {layout['world_size']}; set --actor-num-nodes x --actor-num-gpus-per-node to "
                        f"{saved.get('world_size')!r} (changing the data-parallel size is not supported)")
