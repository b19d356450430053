"""Deploy trained LoRA adapters: one vLLM OpenAI-compatible server for a base model and its adapters.

    python -m slime.serve --hf-checkpoint BASE --adapter math=DIR_A --adapter sub=DIR_B \
        [--host 127.0.0.1] [--port N] [--max-loras N] [--max-lora-rank N] [--dtype float32|bfloat16] \
        [--max-model-len N] [--vllm-python PATH] [--start-timeout S] [--served-model-name NAME] [--log-file PATH]

Before vLLM starts, everything is checked and every problem reported, one ``error:`` line each
(exit status 2, no traceback): ``--hf-checkpoint`` must be a Hugging Face directory with
safetensors weights; every ``--adapter NAME=DIR`` must be a PEFT LoRA directory that the project's
reader (:mod:`slime.utils.peft_format`) accepts and whose ``B A`` fits the base weights (an adapter
of another base model is named as that); names must be unique, differ from the base's served name
and use only letters, digits, ``.``, ``_``, ``-`` (at most 64, starting with a letter or digit); the
port must be free; and the vLLM environment (``--vllm-python``, else ``$SLIME_VLLM_PYTHON``, else
``.venv-vllm``, made by ``make setup-vllm``) must import vLLM.  ``--max-lora-rank`` must be a rank vLLM
accepts (1, 8, 16, 32, 64, ...) and hold every adapter; by default it is the smallest such rank (said on
stderr when that rounds up; 16 with no adapters).  ``--max-loras`` (adapters in one batch) defaults to
max(2, number of adapters).

vLLM runs as a child process (its own process group) bound to ``--host`` (loopback by default: it
has no authentication and loads adapters from any path the server can read), with run-time adapter
loading enabled.  When it is ready one line goes to stdout: the OpenAI base URL, the served model
names and a curl command that loads another adapter without a restart::

    curl -X POST URL/v1/load_lora_adapter -H 'Content-Type: application/json' \
        -d '{"lora_name": "NAME", "lora_path": "/abs/DIR"}'
    curl -X POST URL/v1/unload_lora_adapter -H 'Content-Type: application/json' -d '{"lora_name": "NAME"}'

Requests pick an adapter with ``"model": "NAME"`` (the base model by its served name, by default the
checkpoint directory's name); a name that is not loaded gets HTTP 404.  Ctrl-C or SIGTERM stops vLLM
and all its processes (exit status 0); killing this process stops vLLM too (``PR_SET_PDEATHSIG``).  If
vLLM dies or fails to start, one line names its exit status and log (exit status 3).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

from safetensors import SafetensorError, safe_open

from slime.rollout.vllm_server import (INSTALL_HINT, VLLM_LORA_RANKS, VLLMError, VLLMLaunch, VLLMServer,
                                       find_vllm_python, vllm_lora_rank, vllm_python_error)
from slime.utils.errors import UserError, run_main
from slime.utils.peft_format import PeftAdapter, foreign_base_error, read_peft_adapter

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NO_ADAPTER_RANK = 16


class _Stop(Exception):
    """SIGINT / SIGTERM, raised in the main thread."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slime.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--hf-checkpoint", required=True, help="base Hugging Face model directory (safetensors)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="served as model NAME")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: a free one; default 8000)")
    parser.add_argument("--max-loras", type=int, default=None, help="adapters in one batch (default max(2, #adapters))")
    parser.add_argument("--max-lora-rank", type=int, default=None, help="largest adapter rank (default: fits them)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--vllm-python", default=None, help="python of the vLLM environment (default .venv-vllm)")
    parser.add_argument("--start-timeout", "--vllm-start-timeout", dest="start_timeout", type=float, default=900.0,
                        help="seconds to wait for vLLM to answer /health (default 900)")
    parser.add_argument("--served-model-name", default=None, help="the base model's name (default: its directory's)")
    parser.add_argument("--log-file", default=None, help="vLLM's log (default: a temporary file, named on stderr)")
    return parser


def parse_adapter_specs(specs: list[str], served_name: str) -> tuple[list[tuple[str, Path]], list[str]]:
    """``(name, dir)`` of every ``--adapter NAME=DIR`` with a usable name, and an error per bad one."""
    items: list[tuple[str, Path]] = []
    errors: list[str] = []
    seen: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            errors.append(f"--adapter {spec}: expected NAME=DIR")
        elif not NAME_RE.match(name):
            errors.append(f"--adapter {spec}: bad name {name!r}; use letters, digits, '.', '_', '-' "
                          "(at most 64, starting with a letter or digit)")
        elif name in seen:
            errors.append(f"--adapter {spec}: name {name!r} is given twice (also --adapter {seen[name]})")
        elif name == served_name:
            errors.append(f"--adapter {spec}: name {name!r} is the base model's served name; pick another")
        else:
            seen[name] = spec
            items.append((name, Path(path)))
    return items, errors


def base_weight_shapes(base: Path) -> dict[str, list[int]]:
    """``tensor name -> shape`` of the checkpoint's safetensors files (headers only)."""
    if not (base / "config.json").is_file():
        raise UserError(f"--hf-checkpoint {base}: no config.json there; point it at a Hugging Face model directory")
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise UserError(f"--hf-checkpoint {base}: no *.safetensors weights; re-save with safe_serialization=True")
    shapes: dict[str, list[int]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                shapes.update((key, list(handle.get_slice(key).get_shape())) for key in handle.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{file}: corrupt or truncated safetensors file ({exc})") from None
    return shapes


def fit_errors(adapter: PeftAdapter, shapes: dict[str, list[int]]) -> list[str]:
    """An error per adapter module that the base lacks or whose ``B A`` is not its weight's shape."""
    errors = []
    for module, (a, b) in adapter.modules.items():
        shape = shapes.get(f"{module}.weight")
        if shape is None:
            errors.append(f"{adapter.path}: module {module} is not in the base checkpoint (no {module}.weight); "
                          "the adapter was trained on another model")
        elif [b.shape[0], a.shape[1]] != shape:
            errors.append(foreign_base_error(adapter.path, module, a, b, shape))
    return errors


def check_inputs(args: argparse.Namespace) -> tuple[dict[str, PeftAdapter], list[str]]:
    """The adapters that passed every check, by name, and one message per problem found in the base,
    the adapter names and directories, the port and the vLLM environment."""
    base = Path(args.hf_checkpoint)
    args.served_model_name = args.served_model_name or base.resolve().name
    items, errors = parse_adapter_specs(args.adapter, args.served_model_name)
    try:
        shapes: dict[str, list[int]] | None = base_weight_shapes(base)
    except UserError as exc:
        shapes, errors = None, [str(exc), *errors]
    adapters: dict[str, PeftAdapter] = {}
    for name, path in items:
        if not path.is_dir():
            errors.append(f"--adapter {name}={path}: no such directory")
            continue
        try:
            adapters[name] = read_peft_adapter(path)
        except UserError as exc:
            errors.append(f"--adapter {name}={path}: {exc}")
            continue
        misfits = fit_errors(adapters[name], shapes) if shapes is not None else []
        if misfits:
            errors.append(misfits[0] + (f" (and {len(misfits) - 1} more modules)" if len(misfits) > 1 else ""))
    if args.max_loras is not None and args.max_loras < 1:
        errors.append(f"--max-loras {args.max_loras}: must be at least 1")
    if args.port:
        try:
            with socket.create_server((args.host, args.port)):
                pass
        except OSError as exc:
            errors.append(f"--port {args.port}: cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
                          "pick another port, or 0 for a free one")
    python = find_vllm_python(args.vllm_python)
    if not python.exists():
        errors.append(f"--vllm-python {python}: no vLLM environment there; {INSTALL_HINT}")
    else:
        errors += [vllm_python_error(python) or ""]
    return adapters, [e for e in errors if e]


def report(errors: list[str]) -> None:
    """Each problem as its own ``error:`` line (the last through :func:`run_main`, exit status 2)."""
    for line in errors[:-1]:
        print(f"error: {' '.join(line.splitlines())}", file=sys.stderr, flush=True)
    if errors:
        raise UserError(errors[-1])


def choose_rank(given: int | None, adapters: dict[str, PeftAdapter]) -> tuple[int, str | None]:
    """``--max-lora-rank``: as given (checked), else the vLLM rank that holds the largest adapter, with
    a note when that rounds the largest rank up."""
    largest = max((a.shape[0] for ad in adapters.values() for a, _ in ad.modules.values()), default=0)
    if given is not None:
        if given not in VLLM_LORA_RANKS:
            raise UserError(f"--max-lora-rank {given}: vLLM accepts {', '.join(map(str, VLLM_LORA_RANKS))}")
        if given < largest:
            raise UserError(f"--max-lora-rank {given}: an adapter has rank {largest}; pass at least that")
        return given, None
    if not largest:
        return NO_ADAPTER_RANK, None
    rank = vllm_lora_rank(largest)
    note = (f"slime.serve: --max-lora-rank {rank} (the largest adapter rank is {largest}; vLLM accepts "
            f"{', '.join(map(str, VLLM_LORA_RANKS))})")
    return rank, note if rank != largest else None


def ready_line(server: VLLMServer, models: list[str]) -> str:
    """The one line that says the server is up, what it serves, and how to load another adapter."""
    example = json.dumps({"lora_name": "NAME", "lora_path": "/abs/path/to/adapter"})
    return (f"slime.serve: ready at {server.url}/v1 (OpenAI API; models: {', '.join(models)}; vLLM pid "
            f"{server.pid}, log {server.log_path}); load another adapter: curl -X POST "
            f"{server.url}/v1/load_lora_adapter -H 'Content-Type: application/json' -d '{example}'")


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # one stop; a second signal must not cut it short
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


def serve(launch: VLLMLaunch, log_file: str | None, start_timeout: float, adapters: list[str]) -> None:
    """Start vLLM, say when it is ready, wait until a signal (stop it) or its death (a VLLMError)."""
    server: VLLMServer | None = None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    try:
        server = VLLMServer(launch, log_file)
        print(f"slime.serve: starting vLLM (pid {server.pid}, {server.url}, log {server.log_path})",
              file=sys.stderr, flush=True)
        server.wait_ready(start_timeout)
        status, reply = server.request("GET", "/v1/models", timeout_s=60)
        models = [m["id"] for m in reply.get("data", [])] if status == 200 and isinstance(reply, dict) else []
        missing = [name for name in adapters if name not in models]
        if missing:
            raise VLLMError(f"vLLM started without adapters {', '.join(missing)} (GET /v1/models: {status} "
                            f"{str(reply)[:300]}); log: {server.log_path}")
        print(ready_line(server, models), flush=True)
        while server.exit_code() is None:
            time.sleep(1.0)
        raise server.died()
    except _Stop as stop:
        print(f"slime.serve: {stop} received; stopping vLLM", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    adapters, errors = check_inputs(args)
    rank, note = NO_ADAPTER_RANK, None
    try:
        rank, note = choose_rank(args.max_lora_rank, adapters)
    except UserError as exc:
        errors.append(str(exc))
    report(errors)
    if note:
        print(note, file=sys.stderr, flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"slime.serve: warning: --host {args.host} is not loopback; the server has no authentication and "
              "loads adapters from any path it can read", file=sys.stderr, flush=True)
    launch = VLLMLaunch(model=str(Path(args.hf_checkpoint).resolve()), python=find_vllm_python(args.vllm_python),
                        dtype=args.dtype, host=args.host, port=args.port, max_lora_rank=rank,
                        max_loras=args.max_loras or max(2, len(adapters)), max_model_len=args.max_model_len,
                        lora_modules={name: str(a.path.resolve()) for name, a in adapters.items()},
                        served_model_name=args.served_model_name)
    serve(launch, args.log_file, args.start_timeout, list(adapters))


if __name__ == "__main__":
    run_main(main)
