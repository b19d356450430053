"""PEFT adapter export/import against the real peft library, at TP=1 and TP=2.

Real components: tiny random HF checkpoints, our megatron-core model with LoRA from ``get_model``,
transformers + ``peft.PeftModel`` as the reference, real gloo processes for TP=2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from slime.backends.megatron_utils.arch import ModelArch
from slime.backends.megatron_utils.hf_convert import load_hf_weights
from slime.utils.errors import UserError
from slime.utils.peft_format import CONFIG_NAME, WEIGHTS_NAME
from slime_plugins.lora.lora_layer import lora_modules
from slime_plugins.lora.peft_io import (
    export_peft_adapter,
    load_peft_adapter,
    peft_adapter_config,
    save_peft_adapter,
)
from tests._support.adapters import peft_adapter_with_random_b, randomize_lora_b_
from tests._support.dist import run_distributed
from tests._support.logprobs import megatron_logprobs, peft_logprobs, token_logprobs
from tests._support.numerics import arch_tolerance, assert_close
from tests._support.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.numerics
TOKENS = torch.tensor([[3, 17, 42, 5, 88, 1, 64, 9, 30, 2], [7, 7, 60, 12, 0, 95, 41, 8, 19, 50]])
LORA_FLAGS = ["--use-lora", "--lora-r", "4", "--lora-alpha", "8"]


def _build(checkpoint: Path, *flags: str, tp: int = 1):
    from slime.backends.megatron_utils.model import get_model
    from slime.utils.arguments import parse_args

    args = parse_args(["--hf-checkpoint", str(checkpoint), "--tensor-model-parallel-size", str(tp),
                       *LORA_FLAGS, *flags])
    arch = ModelArch.from_checkpoint(checkpoint)
    chunks = get_model(args, arch, args.lora)
    load_hf_weights(chunks, arch, checkpoint)
    for chunk in chunks:
        chunk.eval()
    return chunks, arch, args


def _token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log p(token_{t+1} | tokens_<=t): ``[b, s-1]``."""
    return token_logprobs(logits, TOKENS)


def _our_logprobs(chunks, arch) -> torch.Tensor:
    return megatron_logprobs(chunks, arch, TOKENS)


@torch.no_grad()
def _hf_logits(base: Path) -> torch.Tensor:
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()(TOKENS).logits


def _hf_logprobs(base: Path) -> torch.Tensor:
    return _token_logprobs(_hf_logits(base))


def _peft_logprobs(base: Path, adapter: Path) -> torch.Tensor:
    return peft_logprobs(base, adapter, TOKENS)


def _lora_state(chunks) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in chunks[0].state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_process) -> dict[str, Path]:
    """A qwen3 base (GQA 2, head_dim != hidden/heads), our TP=1 export of it and a peft-made adapter."""
    root = tmp_path_factory.mktemp("peft")
    base = make_tiny_checkpoint(root, family="qwen3", head_dim=16)
    chunks, arch, args = _build(base)
    randomize_lora_b_(chunks)
    save_peft_adapter(chunks, arch, args.lora, root / "ours")
    peft_adapter_with_random_b(base, root / "peft-made", seed=3, b_std=0.3)  # peft's own: separate q/k/v A's
    return {"root": root, "base": base, "ours": root / "ours", "peft": root / "peft-made"}


def test_export_matches_peft_and_round_trips(setup):
    base, ours = setup["base"], setup["ours"]
    config = json.loads((ours / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    assert config["bias"] == "none" and config["rank_pattern"] == {}
    tensors = load_file(ours / WEIGHTS_NAME)
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight" in tensors
    assert len(tensors) == 2 * 7 * 2  # 2 layers x 7 HF modules x (A, B)

    chunks, arch, args = _build(base)
    atol = arch_tolerance(arch, _hf_logits(base).abs().max(), log_softmax=True)
    assert_close(_our_logprobs(chunks, arch), _hf_logprobs(base), atol=atol, rtol=0, what="B = 0 vs base")
    load_peft_adapter(chunks, arch, ours, args.lora)
    expected = _peft_logprobs(base, ours)
    assert (expected - _hf_logprobs(base)).abs().max() > 1e-2  # the adapter matters
    assert_close(_our_logprobs(chunks, arch), expected, atol=1e-4, rtol=0, what="our import vs peft")
    assert all(layer.r == 4 for _, layer in lora_modules(chunks[0]))  # identical A's: imported at rank r
    exported = export_peft_adapter(chunks, arch)
    assert exported.keys() == tensors.keys() and all(torch.equal(exported[k], tensors[k]) for k in tensors)


def test_peft_made_adapter_imports_exactly_at_rank_3r(setup):
    base, made = setup["base"], setup["peft"]
    chunks, arch, args = _build(base)
    load_peft_adapter(chunks, arch, made, args.lora)
    ranks = {name.rsplit(".", 1)[-1]: layer.r for name, layer in lora_modules(chunks[0])}
    assert ranks == {"linear_qkv": 12, "linear_fc1": 8, "linear_proj": 4, "linear_fc2": 4}
    expected = _peft_logprobs(base, made)
    assert_close(_our_logprobs(chunks, arch), expected, atol=1e-4, rtol=0, what="peft-made adapter: ours vs peft")
    # Re-exported with rank_pattern / alpha_pattern, peft reads the same model back.
    save_peft_adapter(chunks, arch, args.lora, setup["root"] / "re-exported")
    config = json.loads((setup["root"] / "re-exported" / CONFIG_NAME).read_text())
    assert config["rank_pattern"][r"model\.layers\.0\.self_attn\.q_proj"] == 12
    assert_close(_peft_logprobs(base, setup["root"] / "re-exported"), expected, atol=1e-4, rtol=0,
                 what="re-exported vs peft-made, both in peft")


def test_glob_targets_export_only_the_wrapped_modules(setup, tmp_path):
    base = setup["base"]
    chunks, arch, args = _build(base, "--lora-target-modules", "*.layers.0.*.linear_qkv", "linear_fc2")
    randomize_lora_b_(chunks, seed=1)
    save_peft_adapter(chunks, arch, args.lora, tmp_path / "glob")
    config = json.loads((tmp_path / "glob" / CONFIG_NAME).read_text())
    qkv0 = [f"model.layers.0.self_attn.{p}_proj" for p in "kqv"]
    fc2 = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert config["target_modules"] == sorted(qkv0 + fc2)
    assert peft_adapter_config(args.lora, arch)["target_modules"] == config["target_modules"]  # from the flags alone
    assert {k.split(".lora_")[0] for k in load_file(tmp_path / "glob" / WEIGHTS_NAME)} == \
        {f"base_model.model.{m}" for m in qkv0 + fc2}
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "glob")
    wrapped = {n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(qkv0 + fc2)
    assert_close(_our_logprobs(chunks, arch), _peft_logprobs(base, tmp_path / "glob"), atol=1e-4, rtol=0,
                 what="glob targets: ours vs peft")


def test_save_replaces_an_existing_directory_atomically(setup, tmp_path):
    chunks, arch, args = _build(setup["base"])
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    save_peft_adapter(chunks, arch, args.lora, out)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def _edited_copy(src: Path, dst: Path, *, config=None, tensors=None, raw: bytes | None = None) -> Path:
    dst.mkdir()
    data = json.loads((src / CONFIG_NAME).read_text())
    (dst / CONFIG_NAME).write_text(json.dumps(config(data) if config else data))
    if raw is not None:
        (dst / WEIGHTS_NAME).write_bytes(raw)
    else:
        weights = load_file(src / WEIGHTS_NAME)
        save_file(tensors(weights) if tensors else weights, dst / WEIGHTS_NAME)
    return dst


def _renamed(old: str, new: str):
    return lambda t: {k.replace(old, new): v for k, v in t.items()}


def _reshaped(key: str):
    return lambda t: {**t, key: torch.zeros(t[key].shape[0] + 1, t[key].shape[1])}


ERRORS = {
    "missing-config": (None, r"adapter_config.json: missing"),
    "truncated": (dict(raw=b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"), r"adapter_model.safetensors: corrupt or truncated"),
    "unknown-module": (dict(tensors=_renamed("layers.1.mlp.down_proj", "layers.7.mlp.down_proj")),
                       r"module model\.layers\.7\.mlp\.down_proj does not exist in the model"),
    "shape": (dict(tensors=_reshaped("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")),
              r"module model\.layers\.1\.mlp\.down_proj: lora_A \[4, 48\] / lora_B \[33, 4\] do not fit"),
    "peft-type": (dict(config=lambda c: {**c, "peft_type": "IA3"}), r"peft_type is 'IA3', only 'LORA'"),
    "bias": (dict(config=lambda c: {**c, "bias": "all"}), r"bias is 'all'; LoRA bias terms are not supported"),
    "rank": (dict(config=lambda c: {**c, "r": 8, "rank_pattern": {".*": 4}}), r"r=8 but --lora-r 4; pass --lora-r 8"),
    "config-of-other-tensors": (dict(config=lambda c: {**c, "r": 8}),
                                r"module model\.layers\.0\.\S+ has rank 4 but adapter_config\.json gives it r=8"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_adapters_are_one_line_errors_and_load_nothing(setup, tmp_path, case):
    edit, message = ERRORS[case]
    path = tmp_path / case
    if edit is None:
        path.mkdir()
    else:
        _edited_copy(setup["ours"], path, **edit)
    chunks, arch, args = _build(setup["base"])
    before = _lora_state(chunks)
    with pytest.raises(UserError, match=message) as info:
        load_peft_adapter(chunks, arch, path, args.lora)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    after = _lora_state(chunks)
    assert all(torch.equal(before[k], after[k]) for k in before), "nothing may be loaded half-way"


def test_an_adapter_of_another_base_model_is_reported_as_that(setup, tmp_path):
    """A wider and deeper model's adapter: the first complaint is the shape mismatch (a module and
    both shapes), not the layers this model lacks."""
    other = make_tiny_checkpoint(tmp_path, family="qwen3", name="wider-deeper", head_dim=16, hidden_size=48,
                                 num_hidden_layers=4)
    peft_adapter_with_random_b(other, tmp_path / "foreign", r=4, lora_alpha=8)
    chunks, arch, args = _build(setup["base"])
    before = _lora_state(chunks)
    with pytest.raises(UserError) as info:
        load_peft_adapter(chunks, arch, tmp_path / "foreign", args.lora)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "foreign") in message
    assert "the adapter was trained on another base model" in message and "does not exist" not in message
    assert "lora_A [4, 48]" in message or "/ lora_B [48, 4]" in message  # the adapter's shapes ...
    assert "weight" in message and "32" in message  # ... and this model's (hidden 32)
    after = _lora_state(chunks)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- TP=2


def _tp2_worker(rank: int, base: str, ours: str, made: str, out: str) -> dict[str, torch.Tensor]:
    results = {}
    for name, adapter in (("ours", ours), ("made", made)):
        chunks, arch, args = _build(Path(base), tp=2)
        load_peft_adapter(chunks, arch, adapter, args.lora)
        results[name] = _our_logprobs(chunks, arch)
        save_peft_adapter(chunks, arch, args.lora, Path(out) / name)
    return results


@pytest.mark.slow  # one spawn of two processes, each building four models (~40-70 s on 2 cores)
def test_tp2_import_export_match_tp1_and_peft(setup):
    base, ours, made, out = setup["base"], setup["ours"], setup["peft"], setup["root"] / "tp2"
    results = run_distributed(_tp2_worker, 2, tp=2, args=(str(base), str(ours), str(made), str(out)))
    for name, adapter in (("ours", ours), ("made", made)):
        expected = _peft_logprobs(base, adapter)
        for rank_result in results:
            assert_close(rank_result[name], expected, atol=1e-4, rtol=0, what=f"{name}: TP=2 import vs peft")
        assert_close(_peft_logprobs(base, out / name), expected, atol=1e-4, rtol=0, what=f"{name}: TP=2 export in peft")
    tp1, tp2 = load_file(ours / WEIGHTS_NAME), load_file(out / "ours" / WEIGHTS_NAME)
    assert tp1.keys() == tp2.keys() and all(torch.equal(tp1[k], tp2[k]) for k in tp1)
