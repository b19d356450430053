"""Counts from tools/lora_param_count.py against real transformers and peft models."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from slime.utils.errors import UserError, run_main

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "lora_param_count.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("lora_param_count", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


lpc = _load_tool()

TINY_QWEN3 = {
    "model_type": "qwen3", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 128,
    "tie_word_embeddings": False,
}
HF_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_param_count(config: dict) -> int:
    """Parameters of the real transformers model (meta device: no memory, shared weights once)."""
    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def test_qwen3_4b_sanity_values():
    total, lora = lpc.count_lora_params(lpc.PRESETS["qwen3-4b"], 16, ["all-linear"])
    assert lora == 36 * 49_664 * 16 == 28_606_464
    assert total == 4_022_468_096
    one_target = lpc.count_lora_params(lpc.PRESETS["qwen3-4b"], 1, ["linear_qkv"])[1]
    assert one_target == 36 * (2560 + (32 + 2 * 8) * 128)


@pytest.mark.parametrize("preset", sorted(lpc.PRESETS))
def test_preset_totals_match_transformers_models(preset):
    config = lpc.PRESETS[preset]
    assert lpc.count_lora_params(config, 8, ["all-linear"])[0] == _hf_param_count(config)


@pytest.mark.parametrize(
    "config",
    [
        {**TINY_QWEN3, "tie_word_embeddings": True, "attention_bias": True},
        # Qwen2: q/k/v bias always, no o_proj bias, head_dim from hidden / heads.
        {**TINY_QWEN3, "model_type": "qwen2", "head_dim": None},
        {**TINY_QWEN3, "model_type": "llama", "attention_bias": True, "mlp_bias": True},
        {**TINY_QWEN3, "model_type": "mistral", "num_key_value_heads": 4},
    ],
    ids=["qwen3-bias-tied", "qwen2", "llama-bias", "mistral"],
)
def test_tiny_configs_match_transformers_models(config):
    config = {k: v for k, v in config.items() if v is not None}
    assert lpc.count_lora_params(config, 4, ["all-linear"])[0] == _hf_param_count(config)


def _fused_equivalent_of_peft(model, fused_groups: dict[str, list[str]]) -> int:
    """LoRA parameters the fused Megatron modules would train, derived from peft's
    real adapter shapes: one A per fused module (the members' A's must agree),
    B rows stacked over the members."""
    total = 0
    for layer in model.base_model.model.model.layers:
        modules = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
        for members in fused_groups.values():
            a_shapes = {tuple(modules[m].lora_A["default"].weight.shape) for m in members}
            assert len(a_shapes) == 1, "members of a fused module share one input"
            (r, fan_in), = a_shapes
            b_rows = sum(modules[m].lora_B["default"].weight.shape[0] for m in members)
            total += r * fan_in + b_rows * r
    return total


@pytest.mark.parametrize(
    ("hf_targets", "fused_groups"),
    [
        (HF_ALL, {"linear_qkv": ["q_proj", "k_proj", "v_proj"], "linear_proj": ["o_proj"],
                  "linear_fc1": ["gate_proj", "up_proj"], "linear_fc2": ["down_proj"]}),
        (["q_proj", "k_proj", "v_proj", "down_proj"],
         {"linear_qkv": ["q_proj", "k_proj", "v_proj"], "linear_fc2": ["down_proj"]}),
    ],
    ids=["all", "qkv+down"],
)
def test_matches_fused_equivalent_of_real_peft_lora(hf_targets, fused_groups):
    r = 4
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_QWEN3))
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=8, target_modules=hf_targets))
    peft_trainable, peft_all = model.get_nb_trainable_parameters()

    total, lora = lpc.count_lora_params(TINY_QWEN3, r, hf_targets)
    assert total == peft_all - peft_trainable
    assert lora == _fused_equivalent_of_peft(model, fused_groups)
    # peft keeps a separate A for k and v (and for up): r * hidden each, per layer.
    extra_a = sum(len(members) - 1 for members in fused_groups.values())
    layers, hidden = TINY_QWEN3["num_hidden_layers"], TINY_QWEN3["hidden_size"]
    assert peft_trainable - lora == layers * extra_a * r * hidden


def test_target_names_resolve_to_fused_modules():
    assert lpc.resolve_targets(["q_proj,v_proj", "down_proj"]) == ["linear_qkv", "linear_fc2"]
    assert lpc.resolve_targets(["all-linear"]) == list(lpc.MEGATRON_TARGETS)
    assert lpc.resolve_targets(["linear_fc1", "gate_proj", "up_proj"]) == ["linear_fc1"]


def test_table_output(capsys):
    lpc.main(["--model", "qwen3-4b", "smollm2-135m", "--lora-r", "8", "16", "32"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| Model | Total params | LoRA r=8 | r=16 | r=32 |"
    qwen_row = lines[2].split(" | ")
    assert qwen_row[:2] == ["| qwen3-4b", "4,022,468,096"]
    assert qwen_row[3] == "28,606,464 (0.71%)"
    assert lines[3].startswith("| smollm2-135m | 134,515,008 | ")


def test_json_output_from_hf_checkpoint(tmp_path, capsys):
    AutoConfig.for_model(**TINY_QWEN3).save_pretrained(tmp_path)
    lpc.main(["--hf-checkpoint", str(tmp_path), "--lora-r", "2", "--lora-target-modules", "o_proj", "--json"])
    (report,) = json.loads(capsys.readouterr().out)
    total, lora = lpc.count_lora_params(TINY_QWEN3, 2, ["linear_proj"])
    assert report["total_params"] == total == _hf_param_count(TINY_QWEN3)
    assert report["targets"] == ["linear_proj"]
    assert report["lora"] == [{"r": 2, "lora_params": lora, "trainable_percent": pytest.approx(100 * lora / (total + lora))}]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--model", "qwen9-1b"], "--model"),
        (["--hf-checkpoint", "/nonexistent-dir"], "--hf-checkpoint"),
        (["--model", "qwen3-4b", "--lora-r", "8", "0"], "--lora-r"),
        (["--model", "qwen3-4b", "--lora-target-modules", "qkv"], "--lora-target-modules"),
    ],
)
def test_user_errors_are_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: lpc.main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and flag in err


def test_unsupported_model_type_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_QWEN3, "model_type": "qwen3_moe"}))
    with pytest.raises(UserError, match="qwen3_moe"):
        lpc.main(["--hf-checkpoint", str(tmp_path)])


def test_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(TOOL), "--model", "qwen3-4b", "--lora-r", "16", "--json"],
        capture_output=True, text=True, check=True, cwd="/",
    )
    assert json.loads(result.stdout)[0]["lora"][0]["lora_params"] == 28_606_464
