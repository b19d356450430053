"""The rollout-engine interface: what the RL loop asks of whatever generates samples.

The shape follows the LoRA serving APIs of SGLang and vLLM, so an HTTP client for
either can implement it later without the trainer noticing:

* ``generate`` takes token ids (no text: the trainer owns tokenisation) and a
  per-request adapter name, like SGLang's per-request ``lora_path``;
* ``load_lora_adapter`` / ``unload_lora_adapter`` mirror
  ``POST /load_lora_adapter {lora_name, lora_path}`` and its inverse, plus an
  in-memory variant (``tensors=``) for pushing fresh LoRA weights after every
  training step without a round trip through the disk;
* ``update_weights`` mirrors ``/update_weights_from_tensor`` for full-parameter RL;
* ``apply_update`` is the one call the RL loop makes after every training step: it routes the
  trainer's export to ``load_lora_adapter`` (as :data:`POLICY_ADAPTER`, or as the task's name in a
  ``--lora-tasks`` run) or ``update_weights``.

The built-in CPU implementation is :class:`slime.rollout.hf_engine.HFRolloutEngine`;
:mod:`slime.rollout.engines` maps ``--rollout-engine`` names to implementations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, runtime_checkable

import torch

from slime.utils.errors import UserError

FinishReason = Literal["stop", "length"]


@dataclass
class SamplingParams:
    """How to sample one batch of requests.

    ``temperature == 0`` means greedy decoding.  ``top_k <= 0`` and ``top_p == 1``
    disable the respective truncation.  ``seed=None`` draws a fresh seed per call;
    a fixed seed makes a call reproducible for identical inputs and weights.
    ``stop_token_ids=None`` means the model's EOS ids; ``[]`` means never stop early.
    A stop token that ends a sequence is part of its output (the policy must learn
    to emit it, so the trainer needs its id and log-prob).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"SamplingParams.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UserError(f"SamplingParams.temperature={self.temperature}: must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise UserError(f"SamplingParams.top_p={self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The T in the reported ``log softmax(logits / T)``: the sampling temperature, 1 when greedy."""
        return 1.0 if self.greedy else self.temperature


@dataclass
class GenerateOutput:
    """One finished request.

    ``token_ids``: the generated tokens only (no prompt), including the stop token
    when ``finish_reason == "stop"``.  ``logprobs[i]`` belongs to ``token_ids[i]``;
    see :meth:`RolloutEngine.generate` for exactly what it is.
    ``finish_reason``: ``"stop"`` (a stop token was generated) or ``"length"``
    (``max_new_tokens`` reached).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


LoraNames = Sequence["str | None"] | str | None
# What the trainer exports after a step: ``(tensors, adapter_config)`` for a LoRA adapter (PEFT
# key names), or ``(tensors, None)`` for full weights (HF parameter names).
WeightUpdate = tuple[dict[str, torch.Tensor], dict | None]
# The adapter name the RL loop trains and samples from.
POLICY_ADAPTER = "policy"


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation backend that can hot-swap LoRA adapters and base weights."""

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        params: SamplingParams,
        lora_names: LoraNames = None,
    ) -> list[GenerateOutput]:
        """Sample one continuation per prompt; outputs are in request order.

        ``lora_names``: one adapter name per request (``None`` = base model), or a
        single name (or ``None``) for all requests.  Names must have been loaded.

        Log-probs contract (checked by the trainer, the run fails if the mean gap
        exceeds 1e-3, so approximations are not acceptable): for generated token
        ``y_t`` with context ``x, y_<t``,

            logprobs[t] = log_softmax(logits(x, y_<t) / T)[y_t],  in fp32,

        where ``T = params.temperature`` (``T = 1`` when greedy), taken over the
        FULL vocabulary, i.e. BEFORE top-k / top-p truncation.  This equals what a
        trainer gets from one forward pass over prompt+response with logits divided
        by T, so importance ratios start at exactly 1.
        """
        ...

    def load_lora_adapter(
        self,
        name: str,
        path: str | None = None,
        *,
        tensors: dict[str, torch.Tensor] | None = None,
        config: dict | None = None,
    ) -> None:
        """Load a LoRA adapter under ``name`` from a PEFT directory or from tensors.

        Directory form: ``adapter_config.json`` + ``adapter_model.safetensors``.
        Tensor form: PEFT key names without adapter name
        (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) and the
        ``adapter_config.json`` contents as ``config``.  Re-loading an existing name
        with the same config copies the tensors into place (cheap; called after
        every training step).
        """
        ...

    def unload_lora_adapter(self, name: str) -> None:
        """Forget adapter ``name``; later requests naming it are errors."""
        ...

    def list_adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        ...

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Overwrite base-model weights (HF parameter names, any subset) in place."""
        ...

    def apply_update(self, payload: WeightUpdate, adapter: str = POLICY_ADAPTER) -> dict:
        """Switch to the trainer's newest weights.

        ``(tensors, config)`` with a config: ``load_lora_adapter(adapter, tensors=tensors,
        config=config)`` (``adapter``: :data:`POLICY_ADAPTER` in a one-task run, the task's name with
        ``--lora-tasks``, one call per task); ``(tensors, None)``: ``update_weights(tensors)``
        (``adapter`` unused).  Returns metrics:
        ``sync/bytes`` (sum of ``numel * element_size`` over the tensors), ``sync/tensors`` and
        ``sync/engine_seconds``.
        """
        ...

    def health(self) -> dict:
        """A JSON-serialisable status summary (``{"status": "ok", ...}`` when serving)."""
        ...

    def pid(self) -> int:
        """The OS process id of the engine (whose memory the run reports)."""
        ...
