"""``--rollout-engine vllm``: rollouts on a vLLM server, LoRA adapters synced as versioned files.

:class:`VLLMRolloutEngine` implements :class:`slime.rollout.engine.RolloutEngine` over the
OpenAI-compatible HTTP API of one vLLM server it starts and owns
(:class:`slime.rollout.vllm_server.VLLMServer`); the rollout manager runs one per
``--rollout-num-engines`` in its own Ray actor.

Weight sync is adapter-only and versioned.  After every training step the trainer's adapter
tensors reach this actor; it writes them as a PEFT directory (safetensors, no pickle) under a
RAM-backed directory (``/dev/shm`` where present), loads that directory into vLLM under a
new name ``policy-v{N}`` (``POST /v1/load_lora_adapter``), routes new requests for
``policy`` to it and unloads ``policy-v{N-1}`` once no request in flight uses it.  With
``--lora-tasks`` every task's adapter (named after the task) has its own versions ``<task>-v{N}``,
so the server holds up to two versions per task (``--vllm-max-loras`` >= 2 x tasks).  A request
for a name the server does not hold fails (404) instead of silently running on the base model.

Requests carry token ids (the trainer owns tokenisation), a per-request seed and the adapter
name; consecutive identical prompts (the ``n`` samples of one GRPO group) go as one request
with ``n``, so the prompt is prefilled once.  Log-probs are vLLM's ``processed_logprobs``:
``log_softmax(logits / T)`` of the sampled token over the full vocabulary, the
:class:`~slime.rollout.engine.RolloutEngine` contract, as long as no top-k/top-p truncation
is applied (vLLM reports those after truncation; the flags refuse that combination).
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slime.rollout.engine import POLICY_ADAPTER, GenerateOutput, LoraNames, SamplingParams, WeightUpdate
from slime.rollout.vllm_server import (
    VLLMError,
    VLLMLaunch,
    VLLMServer,
    find_vllm_python,
    vllm_lora_rank,
    vllm_python_error,
)
from slime.utils.errors import UserError
from slime.utils.peft_format import write_peft_dir

BASE_MODEL_NAME = "base"
_SEED_STRIDE = 1000  # vLLM seeds the n samples of a request seed, seed + 1, ...: requests stay apart
_MAX_CONCURRENCY = 256


@dataclass(frozen=True)
class VLLMOptions:
    """The ``--vllm-*`` flags, as the engine needs them (built by :mod:`slime.rollout.engines`)."""

    python: str | None = None  # --vllm-python; None: $SLIME_VLLM_PYTHON, else .venv-vllm
    start_timeout_s: float = 600.0
    request_timeout_s: float | None = None  # one HTTP call; None: no limit (the actor deadline still holds)
    lora_rank: int = 16  # the largest adapter rank to serve (rounded up to one vLLM accepts)
    max_loras: int = 2  # two per adapter: the new version loads before the old one is unloaded
    max_model_len: int | None = None
    kv_cache_gib: int | None = None
    seed: int = 0
    log_dir: str | None = None
    extra_args: list[str] = field(default_factory=list)


def ram_backed_dir(prefix: str) -> Path:
    """A fresh private directory in RAM (``/dev/shm``) where the machine has one, else in the temp dir."""
    shm = Path("/dev/shm")
    root = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


class VLLMRolloutEngine:
    """A vLLM server as a :class:`~slime.rollout.engine.RolloutEngine` (see the module docstring)."""

    def __init__(self, hf_checkpoint_dir: str, dtype: torch.dtype = torch.float32, num_threads: int | None = None,
                 merge_adapters: bool = True, options: VLLMOptions | None = None) -> None:
        del num_threads, merge_adapters  # vLLM sizes its own threads; its CPU LoRA path never merges
        options = options or VLLMOptions()
        python = find_vllm_python(options.python)
        problem = vllm_python_error(python)
        if problem:
            raise UserError(problem)
        self.options = options
        log_dir = Path(options.log_dir) if options.log_dir else None
        launch = VLLMLaunch(model=hf_checkpoint_dir, python=python,
                            dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                            max_lora_rank=vllm_lora_rank(options.lora_rank), max_loras=options.max_loras,
                            max_model_len=options.max_model_len, served_model_name=BASE_MODEL_NAME,
                            seed=options.seed, kv_cache_gib=options.kv_cache_gib, extra_args=list(options.extra_args))
        self.server = VLLMServer(launch, log_dir / f"vllm-engine-{os.getpid()}.log" if log_dir else None)
        self.label = f"the vLLM engine of actor pid {os.getpid()}"
        self.sync_root = ram_backed_dir(f"slime-vllm-sync-{os.getpid()}-")
        self._lock = threading.Lock()
        self._current: dict[str, str] = {}  # adapter name -> versioned name requests go to
        self._paths: dict[str, Path | None] = {}  # versioned name -> directory we wrote (None: the user's)
        self._in_flight: dict[str, int] = {}
        self._retired: list[str] = []  # versioned names to unload once nothing uses them
        self._versions: dict[str, itertools.count] = {}  # adapter name -> its version counter
        try:
            self.start_seconds = self.server.wait_ready(options.start_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        rounded = (f"; --lora-r {options.lora_rank} is served with --max-lora-rank {launch.max_lora_rank}, the next "
                   f"rank vLLM accepts" if launch.max_lora_rank != options.lora_rank else "")
        print(f"vLLM ready at {self.server.url} in {self.start_seconds:.0f} s (pid {self.server.pid}, "
              f"log {self.server.log_path}{rounded})", flush=True)

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                 lora_names: LoraNames = None) -> list[GenerateOutput]:
        """One continuation per prompt, in request order (contract: :class:`RolloutEngine`)."""
        names = [lora_names] * len(prompt_token_ids) if lora_names is None or isinstance(lora_names, str) \
            else list(lora_names)
        if len(names) != len(prompt_token_ids):
            raise UserError(f"generate: {len(names)} adapter names for {len(prompt_token_ids)} prompts")
        runs = _runs(prompt_token_ids, names)
        base_seed = params.seed if params.seed is not None else random.randrange(2**30)
        models = self._acquire(names)
        try:
            bodies = [self._body(prompt_token_ids[start], count, models[names[start]], params,
                                 (base_seed + _SEED_STRIDE * i) % (2**31 - _SEED_STRIDE))
                      for i, (start, count) in enumerate(runs)]
            with ThreadPoolExecutor(max_workers=max(1, min(_MAX_CONCURRENCY, len(bodies)))) as pool:
                replies = list(pool.map(self._complete, bodies))
        finally:
            self._release(models.values())
        outputs: list[GenerateOutput] = []
        for (start, count), reply in zip(runs, replies):
            outputs.extend(_outputs(reply, count, self.server.url))
        return outputs

    def _body(self, prompt: list[int], n: int, model: str, params: SamplingParams, seed: int) -> dict:
        body = {"model": model, "prompt": prompt, "n": n, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                "seed": seed, "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False}
        if params.stop_token_ids is not None:  # only these stop (an empty list: none): not the model's EOS
            body.update(ignore_eos=True, stop_token_ids=list(params.stop_token_ids))
        return body

    def _complete(self, body: dict) -> dict:
        status, reply = self.server.request("POST", "/v1/completions", body, self.options.request_timeout_s)
        if status == 404:
            raise VLLMError(f"{self.label}: the server does not hold model {body['model']!r} (404): the adapter "
                            f"was not loaded or was unloaded while in use")
        if status != 200:
            raise VLLMError(f"{self.label}: /v1/completions failed ({status}): {str(reply)[:500]}")
        return reply

    def _acquire(self, names: list[str | None]) -> dict[str | None, str]:
        """The served model for each adapter name, marked in use until :meth:`_release`."""
        with self._lock:
            models = {}
            for name in set(names):
                if name is None:
                    models[name] = BASE_MODEL_NAME
                elif name in self._current:
                    models[name] = self._current[name]
                else:
                    raise UserError(f"generate: adapter {name!r} is not loaded (loaded: {sorted(self._current)})")
            for model in set(models.values()):
                self._in_flight[model] = self._in_flight.get(model, 0) + 1
            return models

    def _release(self, models) -> None:
        with self._lock:
            for model in set(models):
                self._in_flight[model] -= 1
        self._unload_retired()

    # ------------------------------------------------------------------ adapters

    def load_lora_adapter(self, name: str, path: str | None = None, *, tensors: dict[str, torch.Tensor] | None = None,
                          config: dict | None = None) -> int:
        """Load ``name``'s next version (from ``path``, or written from ``tensors`` + ``config``);
        returns the bytes written (0 for a user's directory).  The previous version is unloaded
        once no request uses it."""
        if (path is None) == (tensors is None):
            raise UserError("load_lora_adapter: give exactly one of path= and tensors=")
        versioned = f"{name}-v{next(self._versions.setdefault(name, itertools.count(1)))}"
        written = 0
        own_dir = None
        if tensors is not None:
            own_dir = write_peft_dir(self.sync_root / versioned, tensors, config or {})
            written = sum(f.stat().st_size for f in own_dir.iterdir())
            path = str(own_dir)
        try:
            self.server.post("/v1/load_lora_adapter", {"lora_name": versioned, "lora_path": str(path)},
                             self.options.request_timeout_s)
        except BaseException:
            if own_dir is not None:
                shutil.rmtree(own_dir, ignore_errors=True)
            raise
        with self._lock:
            self._paths[versioned] = own_dir
            previous = self._current.get(name)
            self._current[name] = versioned
            if previous is not None:
                self._retired.append(previous)
        self._unload_retired()
        return written

    def unload_lora_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._current:
                raise UserError(f"unload_lora_adapter: {name!r} is not loaded")
            self._retired.append(self._current.pop(name))
        self._unload_retired()

    def _unload_retired(self) -> None:
        with self._lock:
            idle = [m for m in self._retired if not self._in_flight.get(m)]
            self._retired = [m for m in self._retired if m not in idle]
        for model in idle:
            self.server.post("/v1/unload_lora_adapter", {"lora_name": model}, self.options.request_timeout_s)
            own_dir = self._paths.pop(model, None)
            if own_dir is not None:
                shutil.rmtree(own_dir, ignore_errors=True)

    def list_adapters(self) -> list[str]:
        return sorted(self._current)

    def served_models(self) -> list[str]:
        """What the server itself lists (``GET /v1/models``): the base and every loaded version."""
        status, reply = self.server.request("GET", "/v1/models", timeout_s=self.options.request_timeout_s)
        if status != 200:
            raise VLLMError(f"{self.label}: GET /v1/models failed ({status})")
        return sorted(model["id"] for model in reply["data"])

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        raise UserError("--rollout-engine vllm syncs LoRA adapters only: vLLM has no stable API to reload base "
                        "weights in place; use --use-lora, or --rollout-engine hf for full-parameter RL")

    def apply_update(self, payload: WeightUpdate, adapter: str = POLICY_ADAPTER) -> dict:
        """Load the trainer's adapter as ``adapter``'s next version; ``sync/adapter_version`` is that version."""
        tensors, config = payload
        start = time.time()
        if config is None:
            self.update_weights(tensors)
        written = self.load_lora_adapter(adapter, tensors=tensors, config=config)
        version = int(self._current[adapter].rsplit("-v", 1)[1])
        return {"sync/bytes": float(written), "sync/tensors": float(len(tensors)),
                "sync/engine_seconds": time.time() - start, "sync/adapter_version": float(version)}

    # ------------------------------------------------------------------ status

    def health(self) -> dict:
        status, _ = self.server.request("GET", "/health", timeout_s=30)
        return {"status": "ok" if status == 200 else f"http {status}", "engine": "vllm", "url": self.server.url,
                "server_pid": self.server.pid, "adapters": dict(self._current)}

    def pid(self) -> int:
        """This actor's pid: the vLLM server and its engine process are its children."""
        return os.getpid()

    def server_pid(self) -> int:
        return self.server.pid

    def shutdown(self) -> None:
        """Stop the server and remove the synced adapter files; idempotent."""
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()
        sync_root = getattr(self, "sync_root", None)
        if sync_root is not None:
            shutil.rmtree(sync_root, ignore_errors=True)

    def __del__(self) -> None:
        self.shutdown()


def _runs(prompts: list[list[int]], names: list[str | None]) -> list[tuple[int, int]]:
    """``(start, count)`` of each run of consecutive identical (prompt, adapter) requests."""
    runs: list[tuple[int, int]] = []
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        if runs and prompts[runs[-1][0]] == prompt and names[runs[-1][0]] == name:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _outputs(reply: dict, count: int, url: str) -> list[GenerateOutput]:
    choices = sorted(reply.get("choices") or [], key=lambda c: c["index"])
    if len(choices) != count:
        raise VLLMError(f"vLLM at {url} returned {len(choices)} choices for n={count}")
    outputs = []
    for choice in choices:
        if choice["finish_reason"] not in ("stop", "length"):
            raise VLLMError(f"vLLM at {url} ended a request with finish_reason={choice['finish_reason']!r}")
        token_ids = [int(t) for t in choice["token_ids"]]
        logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]
        if len(logprobs) != len(token_ids):
            raise VLLMError(f"vLLM at {url} returned {len(logprobs)} log-probs for {len(token_ids)} tokens")
        outputs.append(GenerateOutput(token_ids=token_ids, logprobs=logprobs, finish_reason=choice["finish_reason"]))
    return outputs
