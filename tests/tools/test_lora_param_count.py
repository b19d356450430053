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
    count = lpc.count_lora_params(lpc.PRESETS["qwen3-4b"], 16, ["all-linear"])
    assert count.total == 36 * 49_664 * 16 == 28_606_464
    assert count.base == 4_022_468_096
    assert count.experts == 0 and count.attention + count.mlp == count.total
    one_target = lpc.count_lora_params(lpc.PRESETS["qwen3-4b"], 1, ["linear_qkv"])
    assert one_target.total == one_target.attention == 36 * (2560 + (32 + 2 * 8) * 128)


@pytest.mark.parametrize("preset", sorted(lpc.PRESETS))
def test_preset_totals_match_transformers_models(preset):
    config = lpc.PRESETS[preset]
    assert lpc.count_lora_params(config, 8, ["all-linear"]).base == _hf_param_count(config)


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
    assert lpc.count_lora_params(config, 4, ["all-linear"]).base == _hf_param_count(config)


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

    count = lpc.count_lora_params(TINY_QWEN3, r, hf_targets)
    total, lora = count.base, count.total
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
    count = lpc.count_lora_params(TINY_QWEN3, 2, ["linear_proj"])
    total, lora = count.base, count.total
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
    (tmp_path / "config.json").write_text(json.dumps({**TINY_QWEN3, "model_type": "qwen2_moe"}))
    with pytest.raises(UserError, match="qwen2_moe"):
        lpc.main(["--hf-checkpoint", str(tmp_path)])


def test_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(TOOL), "--model", "qwen3-4b", "--lora-r", "16", "--json"],
        capture_output=True, text=True, check=True, cwd="/",
    )
    assert json.loads(result.stdout)[0]["lora"][0]["lora_params"] == 28_606_464


# --- Mixture of experts (Qwen3-MoE) -------------------------------------------------------------

TINY_MOE = {
    "model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
    "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "tie_word_embeddings": False,
}


def test_qwen3_30b_a3b_preset_values():
    count = lpc.count_lora_params(lpc.PRESETS["qwen3-30b-a3b"], 16, ["all-linear"])
    h, i_moe, experts, layers, vocab = 2048, 768, 128, 48, 151936
    attention = 2 * (2 * h) * h + 2 * 512 * h  # q: [4096, 2048], o: [2048, 4096]; k, v: [512, 2048]
    per_layer = attention + 2 * h + 2 * 128 + experts * h + experts * 3 * h * i_moe
    assert count.base == 2 * vocab * h + layers * per_layer + h == 30_532_122_624
    assert count.base == pytest.approx(30.53e9, rel=0.005)  # published: 30.5B
    assert count.attention == layers * 16 * ((h + 5120) + (4096 + h)) == 10_223_616
    assert count.experts == layers * experts * 16 * ((h + 2 * i_moe) + (i_moe + h)) == 629_145_600
    assert count.mlp == 0 and count.total == 639_369_216
    (report,) = [lpc.build_report("m", lpc.PRESETS["qwen3-30b-a3b"], [16], ["all-linear"])]
    assert report["active_params"] == pytest.approx(3.3e9, rel=0.02)  # published: 3.3B activated


def _tiny_moe_model():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**{k: v for k, v in TINY_MOE.items() if k != "model_type"}))


def test_tiny_moe_base_count_matches_transformers_model():
    model = _tiny_moe_model()
    assert all(hasattr(layer.mlp, "experts") for layer in model.model.layers)  # every layer MoE
    assert lpc.count_lora_params(TINY_MOE, 4, ["all-linear"]).base == sum(p.numel() for p in model.parameters())


def _wrapped_lora_params(model, r: int, targets: set[str]) -> dict[str, int]:
    """Build the adapters the trainer would add, from the HF model's real weight shapes:
    fused qkv (one A over q/k/v), proj, and per expert fc1 ([E, 2I, h] -> A [r, h], B [2I, r])
    and fc2 ([E, h, I] -> A [r, I], B [h, r]); count their parameters."""
    adapters = {"attention": torch.nn.ModuleList(), "experts": torch.nn.ModuleList()}

    def wrap(group, fan_in, fan_out):
        adapters[group].append(torch.nn.Sequential(torch.nn.Linear(fan_in, r, bias=False),
                                                   torch.nn.Linear(r, fan_out, bias=False)))

    for layer in model.model.layers:
        attn, experts = layer.self_attn, layer.mlp.experts
        if "linear_qkv" in targets:
            wrap("attention", attn.q_proj.in_features,
                 sum(m.out_features for m in (attn.q_proj, attn.k_proj, attn.v_proj)))
        if "linear_proj" in targets:
            wrap("attention", attn.o_proj.in_features, attn.o_proj.out_features)
        for e in range(experts.gate_up_proj.shape[0]):
            if "linear_fc1" in targets:
                fc1_out, fc1_in = experts.gate_up_proj[e].shape
                wrap("experts", fc1_in, fc1_out)
            if "linear_fc2" in targets:
                fc2_out, fc2_in = experts.down_proj[e].shape
                wrap("experts", fc2_in, fc2_out)
    return {group: sum(p.numel() for p in modules.parameters()) for group, modules in adapters.items()}


@pytest.mark.parametrize(
    "targets",
    [["all-linear"], ["linear_qkv", "linear_proj"], ["gate_proj"], ["down_proj", "o_proj"]],
    ids=["all", "attention", "fc1", "fc2+proj"],
)
def test_tiny_moe_lora_count_matches_wrapped_modules(targets):
    r = 3
    expected = _wrapped_lora_params(_tiny_moe_model(), r, set(lpc.resolve_targets(targets)))
    count = lpc.count_lora_params(TINY_MOE, r, targets)
    assert (count.attention, count.experts, count.mlp) == (expected["attention"], expected["experts"], 0)
    assert count.total == expected["attention"] + expected["experts"] > 0


def test_moe_table_and_json_output(tmp_path, capsys):
    lpc.main(["--model", "qwen3-30b-a3b", "qwen3-4b", "--lora-r", "16"])
    out = capsys.readouterr().out
    assert "| qwen3-4b | 4,022,468,096 | 28,606,464 (0.71%) |" in out  # dense table unchanged
    assert ("| qwen3-30b-a3b (128 experts, top-8) | 30,532,122,624 | 3,353,032,704 | 16 | 10,223,616 | "
            "629,145,600 | 639,369,216 (2.05%) |") in out
    assert "router is frozen" in out
    AutoConfig.for_model(**TINY_MOE).save_pretrained(tmp_path)
    lpc.main(["--hf-checkpoint", str(tmp_path), "--lora-r", "2", "--json"])
    (report,) = json.loads(capsys.readouterr().out)
    count = lpc.count_lora_params(TINY_MOE, 2, ["all-linear"])
    assert (report["total_params"], report["experts"], report["experts_per_token"]) == (count.base, 4, 2)
    (row,) = report["lora"]
    assert (row["lora_params"], row["attention_lora_params"], row["expert_lora_params"]) == (
        count.total, count.attention, count.experts)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
        ({"mlp_only_layers": [0]}, "mlp_only_layers"),
        ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size"),
        ({"num_experts": 0}, "num_experts"),
    ],
)
def test_unsupported_moe_layouts_are_one_line_errors(tmp_path, capsys, extra, key):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_MOE, **extra}))
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: lpc.main(["--hf-checkpoint", str(tmp_path)]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and key in err and "--hf-checkpoint" in err
