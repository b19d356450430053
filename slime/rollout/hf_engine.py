"""The built-in rollout engine: transformers + peft on the CPU (or any torch device).

Generation is a hand-written sampling loop over the HF KV cache, because
``model.generate`` can neither report the exact log-probs the trainer needs nor
share a prompt's prefill among its n samples:

1. Requests are grouped by adapter name (each group runs with that adapter
   active; RL batches almost always use one adapter, so grouping costs nothing
   and keeps the base matmuls dense).
2. Within a group, identical prompts are prefilled once and their KV cache rows
   are gathered out to every request that shares them (``share_prefix``).
3. Prompts are left-padded: ``attention_mask`` hides the padding, and
   ``position_ids = cumsum(mask) - 1`` makes every prompt start at position 0,
   so results do not depend on what else is in the batch.
4. Each decode step feeds one token per live row; rows that emit a stop token
   are dropped from the batch (and its cache) at once.

Adapters are injected with ``peft.inject_adapter_in_model`` under their own
names; re-loading a name with the same config copies the new tensors into the
existing parameters, so a per-step LoRA sync is a memcpy, not a re-injection.

Mixture-of-experts models (Qwen3-MoE) hold their experts as fused 3-D tensors in
transformers 5; peft adapts those with parameter-level LoRA.  An adapter file names
its expert modules one by one (``mlp.experts.{e}.gate_proj``, what every library
reads); peft's own transformers-conversion helpers turn the config and the tensors
into the fused layout, exactly as ``PeftModel.from_pretrained`` does.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
import warnings
from pathlib import Path

import peft
import torch
from peft.functional import delete_adapter, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils.transformers_weight_conversion import (
    convert_peft_adapter_state_dict_for_transformers,
    convert_peft_config_for_transformers,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig

from slime.rollout.engine import POLICY_ADAPTER, GenerateOutput, LoraNames, SamplingParams, WeightUpdate
from slime.rollout.sampling import sample_tokens
from slime.utils.errors import UserError
from slime.utils.failpoints import failpoint
from slime.utils.peft_format import PEFT_KEY_PREFIX, read_peft_adapter, validate_adapter_config

# The LoraConfig fields that fix which modules get adapters, their shapes and the
# scaling; a re-load that agrees on all of them can reuse the injected parameters.
# (Others, e.g. base_model_name_or_path or auto_mapping, vary with how it was saved.)
_CONFIG_FIELDS_FOR_REUSE = (
    "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "target_parameters",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
)  # fmt: skip


class HFRolloutEngine:
    """A :class:`slime.rollout.engine.RolloutEngine` over a local HF checkpoint.

    ``num_threads`` sets torch's (process-wide) intra-op thread count.
    ``share_prefix=False`` prefills every request separately (for tests/benchmarks).
    ``merge_adapters=True`` folds the active adapter into the base weights (peft's merge)
    instead of running it beside them: the same outputs up to fp32 rounding, ~25% faster
    decoding of a 135M model on a CPU. Switching adapters or loading new tensors into the
    merged one unmerges first.
    """

    def __init__(
        self,
        hf_checkpoint_dir: str,
        dtype: torch.dtype = torch.float32,
        num_threads: int | None = None,
        *,
        share_prefix: bool = True,
        merge_adapters: bool = False,
    ) -> None:
        if not (Path(hf_checkpoint_dir) / "config.json").is_file():
            raise UserError(f"rollout checkpoint {hf_checkpoint_dir!r} has no config.json: pass an HF checkpoint dir")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.checkpoint_dir = str(hf_checkpoint_dir)
        self.dtype = dtype
        self.share_prefix = share_prefix
        self.merge_adapters = merge_adapters
        self._merged: str | None = None
        self.model = AutoModelForCausalLM.from_pretrained(hf_checkpoint_dir, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self.eos_token_ids = _default_stop_ids(hf_checkpoint_dir, self.model)
        # Captured before any adapter injection: peft wraps each Linear but keeps its
        # weight Parameter object, so these stay valid under the HF names.
        self._base_tensors: dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=True))
        self._adapters: dict[str, _Adapter] = {}
        self._lora_layers: list[LoraLayer] = []
        self._active: object = None  # adapter name, None (base) or _STALE
        self._weight_updates = 0

    # ----------------------------------------------------------------- generation

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        params: SamplingParams,
        lora_names: LoraNames = None,
    ) -> list[GenerateOutput]:
        """See :meth:`slime.rollout.engine.RolloutEngine.generate` (incl. the log-prob contract)."""
        failpoint("engine.generate")
        names = self._per_request_names(lora_names, len(prompt_token_ids))
        self._check_prompts(prompt_token_ids)
        stop_ids = self.eos_token_ids if params.stop_token_ids is None else list(params.stop_token_ids)
        self._check_token_ids(stop_ids, "SamplingParams.stop_token_ids")
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)

        outputs: list[GenerateOutput | None] = [None] * len(prompt_token_ids)
        with torch.inference_mode():
            for name, request_ids in _group_by_name(names).items():
                if params.seed is not None:
                    # Each adapter's requests draw from the seed's own stream, as they would in a
                    # call of their own: a task's samples do not depend on the other tasks in the call.
                    generator.manual_seed(params.seed)
                self._activate(name)
                prompts = [prompt_token_ids[i] for i in request_ids]
                for i, out in zip(request_ids, self._generate_group(prompts, params, stop_ids, generator)):
                    outputs[i] = out
        return outputs  # type: ignore[return-value]  # every slot filled above

    def _generate_group(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        stop_ids: list[int],
        generator: torch.Generator,
    ) -> list[GenerateOutput]:
        """Prefill (shared per distinct prompt), then decode until every row stops."""
        unique, owner = _dedupe(prompts) if self.share_prefix else (prompts, list(range(len(prompts))))
        input_ids, mask = _left_pad(unique)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, mask, positions, cache)
        if len(unique) < len(prompts):
            rows = torch.tensor(owner)
            cache.batch_select_indices(rows)
            logits, mask, positions = logits[rows], mask[rows], positions[rows]
        next_pos = positions[:, -1] + 1

        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finish: list[str] = ["length"] * len(prompts)
        live = torch.arange(len(prompts))  # request index of each batch row
        stop = torch.tensor(stop_ids, dtype=torch.long)
        for step in range(params.max_new_tokens):
            next_tokens, next_logprobs = sample_tokens(logits, params, generator)
            for row, tok, lp in zip(live.tolist(), next_tokens.tolist(), next_logprobs.tolist()):
                tokens[row].append(tok)
                logprobs[row].append(lp)
            stopped = torch.isin(next_tokens, stop)
            for row in live[stopped].tolist():
                finish[row] = "stop"
            if step + 1 == params.max_new_tokens or bool(stopped.all()):
                break
            if bool(stopped.any()):
                keep = (~stopped).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                live, next_tokens, mask, next_pos = live[keep], next_tokens[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            logits = self._forward(next_tokens[:, None], mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
        return [GenerateOutput(t, lp, f) for t, lp, f in zip(tokens, logprobs, finish)]  # type: ignore[arg-type]

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """Run ``input_ids [b, s]`` through the model, extending ``cache``; return last-position logits ``[b, V]``."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    # ------------------------------------------------------------------- adapters

    def load_lora_adapter(
        self,
        name: str,
        path: str | None = None,
        *,
        tensors: dict[str, torch.Tensor] | None = None,
        config: dict | None = None,
    ) -> None:
        """See :meth:`slime.rollout.engine.RolloutEngine.load_lora_adapter`."""
        _check_adapter_name(name)
        if (path is None) == (tensors is None):
            raise UserError(f"load_lora_adapter({name!r}): pass exactly one of path= or tensors=")
        if path is not None:
            tensors, config = _read_peft_dir(path)
        elif config is None:
            raise UserError(f"load_lora_adapter({name!r}, tensors=...): also pass config= (adapter_config.json dict)")
        lora_config = _lora_config(config, source=path or f"adapter {name!r}")

        existing = self._adapters.get(name)
        if self._merged == name:
            self._unmerge()  # the merged weights hold the old tensors
        if existing is not None and existing.signature == _config_signature(lora_config):
            _copy_adapter_tensors(existing.params, self._model_layout(tensors, name), name)
            return
        if existing is not None:
            self.unload_lora_adapter(name)
        self._inject(name, lora_config)
        try:
            _copy_adapter_tensors(self._adapters[name].params, self._model_layout(tensors, name), name)
        except UserError:
            self.unload_lora_adapter(name)
            raise

    def unload_lora_adapter(self, name: str) -> None:
        """See :meth:`slime.rollout.engine.RolloutEngine.unload_lora_adapter`."""
        if name not in self._adapters:
            raise UserError(f"unload_lora_adapter({name!r}): no such adapter; loaded: {self.list_adapters()}")
        if self._merged == name:
            self._unmerge()
        delete_adapter(self.model, name, prefix="lora_")
        getattr(self.model, "peft_config", {}).pop(name, None)
        del self._adapters[name]
        self._active = _STALE

    def list_adapters(self) -> list[str]:
        return sorted(self._adapters)

    def _model_layout(self, tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        """An adapter file's tensors in the layout of this model's injected parameters (per-expert
        tensors of an MoE model become peft's fused ones; others pass unchanged)."""
        return convert_peft_adapter_state_dict_for_transformers(self.model, self._adapters[name].config, tensors, name)

    def _inject(self, name: str, file_config: peft.LoraConfig) -> None:
        """Add LoRA parameters named ``name`` to every targeted module and index them by PEFT key."""
        lora_config = copy.deepcopy(file_config)
        convert_peft_config_for_transformers(lora_config, self.model, None)  # fused MoE experts
        with warnings.catch_warnings():
            # Several named adapters on one model is exactly what we want.
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            # peft's MoE conversion adds rank/alpha patterns for fused gate_up it does apply (checked
            # in tests/rollout/test_hf_engine.py), and then warns they matched nothing
            warnings.filterwarnings("ignore", message=".*_pattern keys did not match any targeted module.*")
            try:
                inject_adapter_in_model(lora_config, self.model, adapter_name=name)
            except ValueError as exc:
                raise UserError(f"adapter {name!r} does not fit {self.checkpoint_dir}: {exc}") from None
        self.model.eval()  # fresh lora_dropout modules start in training mode
        self.model.requires_grad_(False)
        self._lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        params: dict[str, torch.Tensor] = {}
        for module_name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and name in module.lora_A:
                prefix = f"{PEFT_KEY_PREFIX}{module_name}"
                params[f"{prefix}.lora_A.weight"] = module.lora_A[name].weight
                params[f"{prefix}.lora_B.weight"] = module.lora_B[name].weight
        self._adapters[name] = _Adapter(signature=_config_signature(file_config), config=lora_config, params=params)
        self._active = _STALE

    def _activate(self, name: str | None) -> None:
        """Make ``name`` the only adapter in the forward pass (``None``: plain base model)."""
        if name == self._active:
            return
        if self._merged is not None:
            self._unmerge()
        if self.merge_adapters and name is not None:
            for layer in self._lora_layers:
                if name in layer.lora_A:
                    layer.merge(adapter_names=[name])
            self._merged = name
        for layer in self._lora_layers:
            if name is not None and name in layer.lora_A:
                layer.enable_adapters(True)
                layer.set_adapter(name, inference_mode=True)
            else:
                layer.enable_adapters(False)
        self._active = name

    def _unmerge(self) -> None:
        for layer in self._lora_layers:
            if layer.merged:
                layer.unmerge()
        self._merged = None
        self._active = _STALE

    # ---------------------------------------------------------------- base weights

    def update_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """See :meth:`slime.rollout.engine.RolloutEngine.update_weights`."""
        unknown = sorted(set(state_dict) - set(self._base_tensors))
        if unknown:
            raise UserError(f"update_weights: {len(unknown)} names not in {self.checkpoint_dir}, e.g. {unknown[:3]}")
        for key, value in state_dict.items():
            target = self._base_tensors[key]
            if tuple(value.shape) != tuple(target.shape):
                raise UserError(f"update_weights: {key} has shape {tuple(value.shape)}, model has {tuple(target.shape)}")
        if self._merged is not None:
            self._unmerge()
        with torch.no_grad():
            for key, value in state_dict.items():
                self._base_tensors[key].copy_(value)
        self._weight_updates += 1

    def apply_update(self, payload: WeightUpdate, adapter: str = POLICY_ADAPTER) -> dict:
        """See :meth:`slime.rollout.engine.RolloutEngine.apply_update`."""
        failpoint("engine.apply_update")
        start = time.time()
        tensors, config = payload
        if config is not None:
            self.load_lora_adapter(adapter, tensors=tensors, config=config)
        else:
            self.update_weights(tensors)
        return {"sync/bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                "sync/tensors": len(tensors), "sync/engine_seconds": time.time() - start}

    def pid(self) -> int:
        return os.getpid()

    def health(self) -> dict:
        return {
            "status": "ok",
            "engine": "hf",
            "checkpoint": self.checkpoint_dir,
            "dtype": str(self.dtype).removeprefix("torch."),
            "num_threads": torch.get_num_threads(),
            "adapters": self.list_adapters(),
            "weight_updates": self._weight_updates,
        }

    # ------------------------------------------------------------------ validation

    def _per_request_names(self, lora_names: LoraNames, n: int) -> list[str | None]:
        names = [lora_names] * n if lora_names is None or isinstance(lora_names, str) else list(lora_names)
        if len(names) != n:
            raise UserError(f"generate: {len(names)} lora_names for {n} prompts; pass one per prompt or a single name")
        missing = sorted({x for x in names if x is not None and x not in self._adapters})
        if missing:
            raise UserError(f"generate: adapters {missing} are not loaded; loaded: {self.list_adapters()}")
        return names

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        if any(len(p) == 0 for p in prompts):
            raise UserError("generate: every prompt needs at least one token id")
        for p in prompts:
            self._check_token_ids(p, "generate prompt")

    def _check_token_ids(self, ids: list[int], what: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"{what}: token ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")


_STALE = object()  # "no adapter state known": forces the next _activate to touch every layer


@dataclasses.dataclass
class _Adapter:
    signature: dict  # config fields (as in the file) that fix parameter shapes and the forward pass
    config: peft.LoraConfig  # as injected: for MoE experts, peft's fused layout
    params: dict[str, torch.Tensor]  # PEFT key (no adapter name) -> live parameter


# --------------------------------------------------------------- batching helpers


def _group_by_name(names: list[str | None]) -> dict[str | None, list[int]]:
    """Request indices per adapter name, in order of first appearance."""
    groups: dict[str | None, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    return groups


def _dedupe(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Distinct prompts, and for each request the index of its distinct prompt."""
    index: dict[tuple[int, ...], int] = {}
    owner = [index.setdefault(tuple(p), len(index)) for p in prompts]
    unique = [list(key) for key in index]
    return unique, owner


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to ``(input_ids [b, L], attention_mask [b, L])``; padding is id 0, masked out."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, mask


# ---------------------------------------------------------------- loading helpers


def _default_stop_ids(checkpoint_dir: str, model: torch.nn.Module) -> list[int]:
    """EOS ids from generation_config.json (may be a list), else the model config, else the tokenizer."""
    candidates: list[object] = []
    try:
        candidates.append(GenerationConfig.from_pretrained(checkpoint_dir).eos_token_id)
    except OSError:  # no generation_config.json
        pass
    candidates.append(getattr(model.config, "eos_token_id", None))
    try:
        candidates.append(AutoTokenizer.from_pretrained(checkpoint_dir).eos_token_id)
    except (OSError, ValueError):  # no tokenizer files next to the weights
        pass
    for value in candidates:
        if value is not None:
            return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return []


def _check_adapter_name(name: str) -> None:
    # peft keeps adapters in ModuleDicts keyed by name: dots would split the key path.
    if not isinstance(name, str) or not name or "." in name:
        raise UserError(f"load_lora_adapter: adapter name {name!r} must be a non-empty string without dots")


def _read_peft_dir(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors under their PEFT keys, adapter_config.json)`` of a PEFT directory, validated."""
    adapter = read_peft_adapter(path)
    return adapter.state_dict(), adapter.config


def _lora_config(config: dict, source: str) -> peft.LoraConfig:
    """Build an inference-only LoraConfig from adapter_config.json contents; reject unsupported variants."""
    validate_adapter_config(config, source)
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    kwargs = {k: v for k, v in config.items() if k in known and k not in ("peft_type", "task_type")}
    kwargs.update(lora_dropout=0.0, inference_mode=True)
    try:
        return peft.LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source}: invalid adapter config: {exc}") from None


def _config_signature(config: peft.LoraConfig) -> dict:
    def canonical(value: object) -> object:  # JSON gives lists where peft keeps sets
        return sorted(value) if isinstance(value, (set, list, tuple)) else value

    return {k: canonical(getattr(config, k, None)) for k in _CONFIG_FIELDS_FOR_REUSE}


def _copy_adapter_tensors(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], name: str) -> None:
    """Copy ``tensors`` (PEFT keys) into the adapter's live parameters; all keys and shapes must match exactly."""
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise UserError(
            f"adapter {name!r}: tensor names do not match its config: "
            f"missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})"
        )
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise UserError(f"adapter {name!r}: {key} has shape {tuple(value.shape)}, expected {tuple(params[key].shape)}")
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)
