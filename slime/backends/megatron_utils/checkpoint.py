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
        checkpoint.json                   model shape, LoRA flags, tasks, parallel layout, size + sha256 per file

With ``--lora-tasks`` (several adapters on one frozen base) each task has its own PEFT directory and
link, and the one trainer state holds every task's AdamW state and LR step (keyed by task)::

    DIR/
      add -> iter_0000012/add             DIR/add/adapter: task add's newest adapter (loadable alone by peft)
      mul -> iter_0000012/mul
      iter_0000012/
        add/adapter/  mul/adapter/        one PEFT adapter per task (its own r and alpha)
        trainer_state/  checkpoint.json   as above; checkpoint.json lists the tasks (name, r, alpha)

A resume checks the tasks (names, r, alpha) against the saved ones before reading a tensor.

Crash safety (a process killed at any instant leaves the previous checkpoint usable): the
iteration is written under ``DIR/.iter_0000012.tmp`` and renamed into place only when every rank
has finished and ``checkpoint.json`` lists every file; the ``adapter``/``model`` link is swapped
with one ``os.replace`` (a directory cannot be replaced atomically, a symlink can; per task with tasks); the
``latest`` file is replaced last.  Until then a loader sees the previous iteration.

Only safetensors and JSON are read back (never pickle).  Every file is checked against its size
and sha256 in ``checkpoint.json`` before use, so a truncated or corrupt file is a one-line
:class:`UserError` naming it instead of garbage weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from slime.backends.megatron_utils.arch import ModelArch
from slime.backends.megatron_utils.checkpoint_state import (  # noqa: F401  (re-exported: tests, preflight)
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    Optimizers,
    _check_compatible,
    _file_record,
    _jsonable_args,
    _lora_flags,
    _parallel_layout,
    _read_json,
    _restore_rng,
    _rng_state,
    _verify_files,
    optimizer_map,
    optimizers_state,
    parameter_names,
    restore_optimizers,
    task_flags,
)
from slime.backends.megatron_utils.parallel import barrier, global_rank
from slime.utils.atomic import fsync_path, write_file_atomically, write_json_atomically, write_text_atomically
from slime.utils.errors import UserError
from slime.utils.failpoints import failpoint
from slime.utils.lora_config import LoraConfig

LATEST_FILE = "latest_checkpointed_iteration.txt"
STATE_DIR = "trainer_state"
RNG_STREAM = "rng/stream/"

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


def _links(args: argparse.Namespace) -> dict[str, str]:
    """Link under ``DIR`` -> its target inside the iteration: ``adapter`` or ``model`` for a one-adapter or
    full run; with ``--lora-tasks`` one per task, ``<task> -> iter_N/<task>`` (so ``DIR/<task>/adapter``)."""
    tasks = getattr(args, "tasks", None) or []
    if tasks:
        return {task.name: task.name for task in tasks}
    kind = _weights_kind(args.lora)
    return {kind: kind}


def _weight_dirs(args: argparse.Namespace) -> list[str]:
    """The weight directories inside an iteration: ``adapter`` | ``model``, or ``<task>/adapter`` per task."""
    tasks = getattr(args, "tasks", None) or []
    return [f"{task.name}/adapter" for task in tasks] or [_weights_kind(args.lora)]


# ---------------------------------------------------------------------------------------------
# Weights: the adapter(s) (PEFT) or the full model (HF)
# ---------------------------------------------------------------------------------------------

def _hf_config(arch: ModelArch, args: argparse.Namespace) -> dict:
    """The saving run's HF config.json (so the weights load in transformers as they came)."""
    source = args.hf_checkpoint
    if source is None or not (Path(source) / "config.json").is_file():
        raise UserError("--save without --use-lora writes HF weights and needs --hf-checkpoint (its config.json)")
    return json.loads((Path(source) / "config.json").read_text())


def _save_weights(iter_dir: Path, chunks: Sequence[nn.Module], arch: ModelArch, args: argparse.Namespace) -> None:
    """All ranks call (TP shards are gathered); rank 0 writes the :func:`_weight_dirs` under ``iter_dir``."""
    from slime_plugins.lora.lora_layer import use_adapter
    from slime_plugins.lora.peft_io import save_peft_adapter

    for task in getattr(args, "tasks", None) or []:  # each its own PEFT directory, loadable alone by peft
        with use_adapter(chunks, task.name):
            save_peft_adapter(chunks, arch, task.lora, iter_dir / task.name / "adapter",
                              base_model_name_or_path=args.hf_checkpoint)
    if getattr(args, "tasks", None):
        return
    if args.lora is not None:
        save_peft_adapter(chunks, arch, args.lora, iter_dir / "adapter", base_model_name_or_path=args.hf_checkpoint)
        return
    from slime.backends.megatron_utils.hf_checkpoint import save_hf_checkpoint
    from slime.backends.megatron_utils.hf_convert import export_hf_weights

    state_dict = export_hf_weights(chunks, arch)
    if global_rank() == 0:
        save_hf_checkpoint(state_dict, _hf_config(arch, args), iter_dir / "model")


def _load_weights(iter_dir: Path, chunks: Sequence[nn.Module], arch: ModelArch, args: argparse.Namespace) -> None:
    from slime_plugins.lora.lora_layer import use_adapter
    from slime_plugins.lora.peft_io import load_peft_adapter

    for task in getattr(args, "tasks", None) or []:
        with use_adapter(chunks, task.name):
            load_peft_adapter(chunks, arch, iter_dir / task.name / "adapter", task.lora)
    if getattr(args, "tasks", None):
        return
    if args.lora is not None:
        load_peft_adapter(chunks, arch, iter_dir / "adapter", args.lora)
    else:
        from slime.backends.megatron_utils.hf_convert import load_hf_weights

        load_hf_weights(chunks, arch, iter_dir / "model")


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------

def _staging_dirs(save_dir: Path, iteration: int) -> tuple[Path, Path, Path]:
    """(final, staging, replaced): the iteration, its in-progress name, a same-iteration re-save's old copy."""
    name = iter_dir_name(iteration)
    return save_dir / name, save_dir / f".{name}.tmp", save_dir / f".{name}.replaced"


def _prepare(save_dir: Path, iteration: int, links: Sequence[str]) -> None:
    """Rank 0: clear what a killed save left behind and make the staging directory."""
    for name in links:
        link = save_dir / name
        if link.exists() and not link.is_symlink():
            raise UserError(f"{link}: a real directory where the trainer keeps a link to the newest {name}; "
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


def _save_trainer_state(state_dir: Path, chunks: Sequence[nn.Module], optimizers: Optimizers,
                        extra_state: dict, rng_streams: Mapping[str, torch.Tensor]) -> None:
    """This rank's optimizer(s) + RNG tensors (safetensors) and scalars (JSON)."""
    rank = global_rank()
    opt_tensors, opt_scalars = optimizers_state(optimizer_map(optimizers), parameter_names(chunks))
    rng_tensors, rng_scalars = _rng_state()
    rng_tensors |= {f"{RNG_STREAM}{name}": state for name, state in rng_streams.items()}
    write_file_atomically(state_dir / f"rank_{rank:05d}.safetensors",
                          lambda tmp: save_file({**opt_tensors, **rng_tensors}, str(tmp)))
    write_json_atomically(state_dir / f"rank_{rank:05d}.json",
                          {"rank": rank, **opt_scalars, "rng": rng_scalars, "extra_state": extra_state}, indent=1)


def _describe(staging: Path, iteration: int, arch: ModelArch, args: argparse.Namespace) -> dict:
    files = {str(p.relative_to(staging)): _file_record(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    tasks = task_flags(args)
    return {"format": FORMAT, "version": FORMAT_VERSION, "iteration": iteration, "weights": _weights_kind(args.lora),
            "model": dataclasses.asdict(arch), "lora": _lora_flags(args.lora), "parallel": _parallel_layout(args),
            **({"tasks": tasks} if tasks else {}), "files": files}


def _publish(save_dir: Path, iteration: int, links: dict[str, str]) -> None:
    """Rank 0: staging -> ``iter_N``, each link -> ``iter_N/<target>``, then ``latest``; each step atomic."""
    final, staging, replaced = _staging_dirs(save_dir, iteration)
    fsync_path(staging)
    if final.exists():  # saving an iteration again (e.g. resumed twice): keep the old one until the swap
        os.replace(final, replaced)
    os.replace(staging, final)
    shutil.rmtree(replaced, ignore_errors=True)
    fsync_path(save_dir)
    _stage_done("rename")
    for name, target in links.items():  # each link swaps atomically; `latest` (below) is what a loader trusts
        link_tmp = save_dir / f".{name}.link.tmp"
        link_tmp.unlink(missing_ok=True)
        os.symlink(f"{final.name}/{target}", link_tmp)
        os.replace(link_tmp, save_dir / name)
    _stage_done("link")
    write_text_atomically(save_dir / LATEST_FILE, f"{iteration}\n")  # fsyncs save_dir too
    _stage_done("latest")


def save_checkpoint(save_dir: str | Path, iteration: int, chunks: Sequence[nn.Module], arch: ModelArch,
                    args: argparse.Namespace, optimizers: Optimizers, extra_state: dict,
                    rng_streams: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write iteration ``iteration`` under ``save_dir`` (every training rank calls; see module doc).

    ``optimizers``: adapter name -> optimizer (one per ``--lora-tasks`` task), or the one optimizer.
    ``extra_state`` is this rank's JSON-serialisable trainer state (data positions, metrics step, ...)
    and comes back from :func:`load_checkpoint`.  ``rng_streams``: named generator states besides the
    global ones (one per task), restored by :func:`load_checkpoint`.  Returns the final iteration directory.
    """
    save_dir = Path(save_dir)
    links = _links(args)
    json.dumps(extra_state)  # fail before writing anything when the trainer passes a non-JSON value
    if global_rank() == 0:
        _prepare(save_dir, iteration, list(links))
    barrier()
    final, staging, _ = _staging_dirs(save_dir, iteration)
    _save_trainer_state(staging / STATE_DIR, chunks, optimizers, extra_state, rng_streams or {})
    _stage_done("trainer_state")
    if global_rank() == 0:
        failpoint("trainer.save.mid")  # staging holds the trainer state, not yet the weights or the manifest
    _save_weights(staging, chunks, arch, args)
    _stage_done("weights")
    barrier()  # every rank's files are in staging before rank 0 lists and renames them
    if global_rank() == 0:
        write_json_atomically(staging / STATE_DIR / "args.json", _jsonable_args(args), indent=1)
        write_json_atomically(staging / META_FILE, _describe(staging, iteration, arch, args), indent=1)
        _stage_done("manifest")
        failpoint("trainer.save.unpublished")  # complete under its staging name, not yet renamed
        _publish(save_dir, iteration, links)
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
                    optimizers: Optimizers, rng_streams: dict[str, torch.Tensor] | None = None) -> tuple[int, dict]:
    """Restore the newest checkpoint in ``load_dir``; returns ``(iteration, extra_state)``.

    ``rng_streams``: the named generator states :func:`save_checkpoint` was given, overwritten in
    place with the saved ones (a name that was not saved keeps its value).

    Every training rank calls.  Restores the adapter(s) (every ``--lora-tasks`` task's, or the one, or
    the full weights), each optimizer's AdamW state and LR-schedule step (``optimizers`` as for
    :func:`save_checkpoint`; None: weights and RNG only) and all RNG streams, so the next step is the
    one an uninterrupted run takes.
    """
    load_dir = Path(load_dir)
    iteration, iter_dir = _latest_iter_dir(load_dir)
    meta = _read_json(iter_dir / META_FILE)
    _check_compatible(meta, arch, args, iter_dir / META_FILE)
    rank = global_rank()
    state_files = [f"{STATE_DIR}/rank_{rank:05d}.safetensors", f"{STATE_DIR}/rank_{rank:05d}.json"]
    prefixes = tuple(f"{d}/" for d in _weight_dirs(args))
    weight_files = sorted(name for name in meta["files"] if name.startswith(prefixes))
    _verify_files(iter_dir, meta["files"], weight_files + state_files)
    _load_weights(iter_dir, chunks, arch, args)
    tensors = _load_tensors(iter_dir / state_files[0])
    state = _read_json(iter_dir / state_files[1])
    if optimizers is not None:
        restore_optimizers(optimizer_map(optimizers), parameter_names(chunks), tensors, state,
                           iter_dir / state_files[0])
    _restore_rng(tensors, state["rng"])
    for name in rng_streams if rng_streams is not None else ():
        rng_streams[name] = tensors.get(f"{RNG_STREAM}{name}", rng_streams[name])
    barrier()
    return iteration, state["extra_state"]
