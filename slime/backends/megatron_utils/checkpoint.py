"""Save and resume training: weights, AdamW state, LR step, RNG streams and trainer state.

Layout of a ``--save`` directory::

    DIR/
      latest_checkpointed_iteration.txt   the newest complete iteration ("12"); written last
      adapter -> iter_0000012/adapter     newest adapter (--use-lora): point a serving engine here
      model -> iter_0000012/model         newest full weights (without --use-lora)
      iter_0000012/
        adapter/ | model/                 PEFT adapter (peft, vLLM, SGLang) | HF weights (safetensors)
        trainer_state/
          rank_00000.safetensors          AdamW tensors by parameter name, RNG generator states
          rank_00000.json                 LR-schedule step, Python/NumPy RNG, extra_state
          args.json                       vars(args), non-JSON values as str
        checkpoint.json                   model shape, LoRA flags, parallel layout, size + sha256 per file

Crash safety (a process killed at any instant leaves the previous checkpoint usable): the
iteration is written under ``DIR/.iter_0000012.tmp`` and renamed into place only when every rank
has finished and ``checkpoint.json`` lists every file; the ``adapter``/``model`` link is swapped
with one ``os.replace`` (a directory cannot be replaced atomically, a symlink can); the
``latest`` file is replaced last.  Until then a loader sees the previous iteration.

Only safetensors and JSON are read back (never pickle).  Every file is checked against its size
and sha256 in ``checkpoint.json`` before use, so a truncated or corrupt file is a one-line
:class:`UserError` naming it instead of garbage weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from slime.backends.megatron_utils.arch import ModelArch
from slime.backends.megatron_utils.optimizer import TrainOptimizer
from slime.backends.megatron_utils.parallel import barrier, global_rank, global_world_size, unwrap_model
from slime.utils.atomic import fsync_path, write_file_atomically, write_json_atomically, write_text_atomically
from slime.utils.errors import UserError, read_json_file
from slime.utils.failpoints import failpoint
from slime.utils.lora_config import LoraConfig

FORMAT = "slime-checkpoint"
FORMAT_VERSION = 1
LATEST_FILE = "latest_checkpointed_iteration.txt"
META_FILE = "checkpoint.json"
STATE_DIR = "trainer_state"

# Test hook: SLIME_CHECKPOINT_CRASH_AFTER=<stage> ends the process right after that stage of a
# save, the way a kill would (no cleanup runs).  Stages in the order they happen:
SAVE_STAGES: tuple[str, ...] = ("trainer_state", "weights", "manifest", "rename", "link", "latest")
CRASH_ENV = "SLIME_CHECKPOINT_CRASH_AFTER"
CRASH_EXIT_CODE = 86


def _kill() -> None:
    os._exit(CRASH_EXIT_CODE)


def _stage_done(stage: str) -> None:
    if os.environ.get(CRASH_ENV) == stage:
        _kill()


# ---------------------------------------------------------------------------------------------
# Small file-system helpers
# ---------------------------------------------------------------------------------------------

def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _weights_kind(lora: LoraConfig | None) -> str:
    """``adapter`` with LoRA, ``model`` (full HF weights) without."""
    return "adapter" if lora is not None else "model"


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
    """``id(param) -> "chunk{i}.<dotted name>"``: optimizer state is keyed by name, not position."""
    names: dict[int, str] = {}
    for index, chunk in enumerate(chunks):
        for name, param in unwrap_model(chunk).named_parameters():
            names.setdefault(id(param), f"chunk{index}.{name}")
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


def _parallel_layout(args: argparse.Namespace, world_size: int | None = None) -> dict:
    return {"tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
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
    for key in lora or {}:
        if saved_lora.get(key) != lora[key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{path}: checkpoint was saved with {flag} {saved_lora.get(key)!r}, this run has "
                            f"{flag} {lora[key]!r}; resume with {flag} {saved_lora.get(key)!r}")
    layout, saved = _parallel_layout(args, world_size), meta["parallel"]
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if saved.get(key) != layout[key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{path}: checkpoint was saved with {flag} {saved.get(key)!r}, this run has "
                            f"{layout[key]}; resume with {flag} {saved.get(key)!r} (resharding optimizer "
                            f"state across parallel sizes is not supported)")
    if saved.get("world_size") != layout["world_size"]:
        raise UserError(f"{path}: checkpoint was saved by {saved.get('world_size')!r} training processes, this "
                        f"run has {layout['world_size']}; set --actor-num-nodes x --actor-num-gpus-per-node to "
                        f"{saved.get('world_size')!r} (changing the data-parallel size is not supported)")


# ---------------------------------------------------------------------------------------------
# Weights: the adapter (PEFT) or the full model (HF)
# ---------------------------------------------------------------------------------------------

def _hf_config(arch: ModelArch, args: argparse.Namespace) -> dict:
    """The saving run's HF config.json (so the weights load in transformers as they came)."""
    source = args.hf_checkpoint
    if source is None or not (Path(source) / "config.json").is_file():
        raise UserError("--save without --use-lora writes HF weights and needs --hf-checkpoint (its config.json)")
    return json.loads((Path(source) / "config.json").read_text())


def _save_weights(out_dir: Path, chunks: Sequence[nn.Module], arch: ModelArch, args: argparse.Namespace) -> None:
    """All ranks call (TP shards are gathered); rank 0 writes ``out_dir``."""
    if args.lora is not None:
        from slime_plugins.lora.peft_io import save_peft_adapter

        save_peft_adapter(chunks, arch, args.lora, out_dir, base_model_name_or_path=args.hf_checkpoint)
        return
    from slime.backends.megatron_utils.hf_convert import export_hf_weights, save_hf_checkpoint

    state_dict = export_hf_weights(chunks, arch)
    if global_rank() == 0:
        save_hf_checkpoint(state_dict, _hf_config(arch, args), out_dir)


def _load_weights(weights_dir: Path, chunks: Sequence[nn.Module], arch: ModelArch, args: argparse.Namespace) -> None:
    if args.lora is not None:
        from slime_plugins.lora.peft_io import load_peft_adapter

        load_peft_adapter(chunks, arch, weights_dir, args.lora)
    else:
        from slime.backends.megatron_utils.hf_convert import load_hf_weights

        load_hf_weights(chunks, arch, weights_dir)


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------

def _staging_dirs(save_dir: Path, iteration: int) -> tuple[Path, Path, Path]:
    """(final, staging, replaced): the iteration, its in-progress name, a same-iteration re-save's old copy."""
    name = iter_dir_name(iteration)
    return save_dir / name, save_dir / f".{name}.tmp", save_dir / f".{name}.replaced"


def _prepare(save_dir: Path, iteration: int, kind: str) -> None:
    """Rank 0: clear what a killed save left behind and make the staging directory."""
    link = save_dir / kind
    if link.exists() and not link.is_symlink():
        raise UserError(f"{link}: a real directory where the trainer keeps a link to the newest {kind}; "
                        f"move it out of the --save directory")
    save_dir.mkdir(parents=True, exist_ok=True)
    for stale in save_dir.glob(".iter_*"):
        final = save_dir / stale.name[1:].split(".")[0]
        if stale.name.endswith(".replaced") and not final.exists():
            os.replace(stale, final)  # a killed re-save: its old copy is the last complete one
        else:
            shutil.rmtree(stale)
    _, staging, _ = _staging_dirs(save_dir, iteration)
    (staging / STATE_DIR).mkdir(parents=True)


def _save_trainer_state(state_dir: Path, chunks: Sequence[nn.Module], optimizer: TrainOptimizer,
                        extra_state: dict) -> None:
    """This rank's optimizer + RNG tensors (safetensors) and scalars (JSON)."""
    rank = global_rank()
    opt_tensors, opt_scalars = _optimizer_state(optimizer, parameter_names(chunks))
    rng_tensors, rng_scalars = _rng_state()
    write_file_atomically(state_dir / f"rank_{rank:05d}.safetensors",
                          lambda tmp: save_file({**opt_tensors, **rng_tensors}, str(tmp)))
    write_json_atomically(state_dir / f"rank_{rank:05d}.json",
                          {"rank": rank, "optimizer": opt_scalars, "rng": rng_scalars, "extra_state": extra_state},
                          indent=1)


def _describe(staging: Path, iteration: int, arch: ModelArch, args: argparse.Namespace) -> dict:
    files = {str(p.relative_to(staging)): _file_record(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    return {"format": FORMAT, "version": FORMAT_VERSION, "iteration": iteration, "weights": _weights_kind(args.lora),
            "model": dataclasses.asdict(arch), "lora": _lora_flags(args.lora), "parallel": _parallel_layout(args),
            "files": files}


def _publish(save_dir: Path, iteration: int, kind: str) -> None:
    """Rank 0: staging -> ``iter_N``, link -> ``iter_N/<kind>``, then ``latest``; each step atomic."""
    final, staging, replaced = _staging_dirs(save_dir, iteration)
    fsync_path(staging)
    if final.exists():  # saving an iteration again (e.g. resumed twice): keep the old one until the swap
        os.replace(final, replaced)
    os.replace(staging, final)
    shutil.rmtree(replaced, ignore_errors=True)
    fsync_path(save_dir)
    _stage_done("rename")
    link_tmp = save_dir / f".{kind}.link.tmp"
    link_tmp.unlink(missing_ok=True)
    os.symlink(f"{final.name}/{kind}", link_tmp)
    os.replace(link_tmp, save_dir / kind)
    _stage_done("link")
    write_text_atomically(save_dir / LATEST_FILE, f"{iteration}\n")  # fsyncs save_dir too
    _stage_done("latest")


def save_checkpoint(save_dir: str | Path, iteration: int, chunks: Sequence[nn.Module], arch: ModelArch,
                    args: argparse.Namespace, optimizer: TrainOptimizer, extra_state: dict) -> Path:
    """Write iteration ``iteration`` under ``save_dir`` (every training rank calls; see module doc).

    ``extra_state`` is this rank's JSON-serialisable trainer state (data position, metrics step, ...)
    and comes back from :func:`load_checkpoint`.  Returns the final iteration directory.
    """
    save_dir = Path(save_dir)
    kind = _weights_kind(args.lora)
    json.dumps(extra_state)  # fail before writing anything when the trainer passes a non-JSON value
    if global_rank() == 0:
        _prepare(save_dir, iteration, kind)
    barrier()
    final, staging, _ = _staging_dirs(save_dir, iteration)
    _save_trainer_state(staging / STATE_DIR, chunks, optimizer, extra_state)
    _stage_done("trainer_state")
    if global_rank() == 0:
        failpoint("trainer.save.mid")  # staging holds the trainer state, not yet the weights or the manifest
    _save_weights(staging / kind, chunks, arch, args)
    _stage_done("weights")
    barrier()  # every rank's files are in staging before rank 0 lists and renames them
    if global_rank() == 0:
        write_json_atomically(staging / STATE_DIR / "args.json", _jsonable_args(args), indent=1)
        write_json_atomically(staging / META_FILE, _describe(staging, iteration, arch, args), indent=1)
        _stage_done("manifest")
        failpoint("trainer.save.unpublished")  # complete under its staging name, not yet renamed
        _publish(save_dir, iteration, kind)
    barrier()
    return final


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------

def read_latest_iteration(load_dir: str | Path) -> int:
    """The iteration named by ``latest_checkpointed_iteration.txt`` (UserError when absent or garbled)."""
    path = Path(load_dir) / LATEST_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing; --load must be a --save directory holding a finished checkpoint")
    text = path.read_bytes().decode("utf-8", errors="replace").strip()
    # ASCII digits only (str.isdigit also takes '²', which int() refuses), and few enough for int()
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise UserError(f"{path}: expected an iteration number, found {text[:40]!r}; the file is corrupt")
    return int(text)


def newest_checkpoint(save_dir: str | Path) -> tuple[int, Path] | None:
    """``(iteration, directory)`` of the checkpoint ``--load save_dir`` would resume from, or None
    when there is none (no ``latest`` file yet, a garbled one, or the iteration it names is gone)."""
    try:
        iteration = read_latest_iteration(save_dir)
    except (UserError, OSError):
        return None
    final, _, replaced = _staging_dirs(Path(save_dir), iteration)
    for iter_dir in (final, replaced):  # the order load_checkpoint picks them in
        if (iter_dir / META_FILE).is_file():
            return iteration, iter_dir
    return None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc}); resume from another checkpoint") from None


def _latest_iter_dir(load_dir: Path) -> tuple[int, Path]:
    """``(iteration, directory)`` that ``latest_checkpointed_iteration.txt`` names (a killed re-save's old copy
    when the renamed one is gone); UserError when the file is absent or garbled or the directory is gone."""
    iteration = read_latest_iteration(load_dir)
    final, _, replaced = _staging_dirs(load_dir, iteration)
    iter_dir = final if final.is_dir() or not replaced.is_dir() else replaced
    if not iter_dir.is_dir():
        raise UserError(f"{load_dir / LATEST_FILE}: names iteration {iteration} but {final} does not exist; the "
                        "file or the directory was changed by hand, resume from another checkpoint")
    return iteration, iter_dir


def load_dir_problem(load_dir: str | Path, arch: ModelArch, args: argparse.Namespace, *,
                     world_size: int) -> str | None:
    """What :func:`load_checkpoint` would refuse in ``--load load_dir`` before it reads a tensor, or None:
    the latest-iteration file, the iteration directory, ``checkpoint.json`` and its fit with this run's model,
    LoRA flags and layout (``world_size`` training processes), and every listed file's presence and size (the
    trainer checks the sha256).  For the start-up checks, in the driver before Ray starts."""
    try:
        _, iter_dir = _latest_iter_dir(Path(load_dir))
        meta = _read_json(iter_dir / META_FILE)
        _check_compatible(meta, arch, args, iter_dir / META_FILE, world_size=world_size)
        _verify_files(iter_dir, meta["files"], sorted(meta["files"]), hashes=False)
    except UserError as exc:
        return str(exc)
    return None


def load_checkpoint(load_dir: str | Path, chunks: Sequence[nn.Module], arch: ModelArch, args: argparse.Namespace,
                    optimizer: TrainOptimizer | None) -> tuple[int, dict]:
    """Restore the newest checkpoint in ``load_dir``; returns ``(iteration, extra_state)``.

    Every training rank calls.  Restores the adapter (or full weights), the AdamW state, the
    LR-schedule step and all RNG streams, so the next step is the one an uninterrupted run takes.
    """
    load_dir = Path(load_dir)
    iteration, iter_dir = _latest_iter_dir(load_dir)
    meta = _read_json(iter_dir / META_FILE)
    _check_compatible(meta, arch, args, iter_dir / META_FILE)
    kind = _weights_kind(args.lora)
    rank = global_rank()
    state_files = [f"{STATE_DIR}/rank_{rank:05d}.safetensors", f"{STATE_DIR}/rank_{rank:05d}.json"]
    weight_files = sorted(name for name in meta["files"] if name.startswith(f"{kind}/"))
    _verify_files(iter_dir, meta["files"], weight_files + state_files)
    _load_weights(iter_dir / kind, chunks, arch, args)
    tensors = _load_tensors(iter_dir / state_files[0])
    state = _read_json(iter_dir / state_files[1])
    if optimizer is not None:
        _restore_optimizer(optimizer, parameter_names(chunks), tensors, state["optimizer"], iter_dir / state_files[0])
    _restore_rng(tensors, state["rng"])
    barrier()
    return iteration, state["extra_state"]
