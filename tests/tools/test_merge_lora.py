"""tools/merge_lora.py against peft's own merge_and_unload on real tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from slime.utils.errors import UserError
from tests._support.adapters import peft_adapter_with_random_b
from tests._support.tiny_models import make_tiny_checkpoint
from tests._support.numerics import assert_close
from tools.merge_lora import merge_lora

ROOT = Path(__file__).resolve().parents[2]
TOKENS = torch.tensor([[3, 17, 42, 5, 88, 1, 64, 9]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("family,config", [
    ("qwen3", dict(use_rslora=True)),
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
                   alpha_pattern={"down_proj": 3.0})),
])
@pytest.mark.numerics
def test_merge_equals_peft_merge_and_unload(tmp_path, family, config):
    base = make_tiny_checkpoint(tmp_path, family=family)
    peft_model = peft_adapter_with_random_b(base, tmp_path / "adapter", **config)
    expected = _logits(peft_model.merge_and_unload())
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "stale.txt").write_text("replaced")  # an existing output is replaced whole
    out = merge_lora(base, tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter does change the model
    assert_close(_logits(merged), expected, atol=1e-4, rtol=0, what=f"{family}: merged vs peft merge_and_unload")
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    assert not list(tmp_path.glob("merged.*")), "no staging directories left behind"


@pytest.mark.numerics
def test_sharded_checkpoint_and_cli(tmp_path):
    base = make_tiny_checkpoint(tmp_path, family="qwen2")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    peft_model = peft_adapter_with_random_b(base, tmp_path / "adapter")
    expected = _logits(peft_model.merge_and_unload())
    result = subprocess.run([sys.executable, "tools/merge_lora.py", "--hf-checkpoint", str(sharded), "--adapter",
                             str(tmp_path / "adapter"), "--output", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == \
        sorted(p.name for p in sharded.glob("*.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert_close(_logits(merged), expected, atol=1e-4, rtol=0, what="sharded CLI merge vs peft merge_and_unload")


def test_errors_are_one_line_user_errors(tmp_path):
    base = make_tiny_checkpoint(tmp_path, family="llama")
    other = make_tiny_checkpoint(tmp_path, family="llama", name="wide", hidden_size=48)
    peft_adapter_with_random_b(other, tmp_path / "wide-adapter")
    with pytest.raises(UserError, match=r"module model\.layers\.0\.\w+\.\w+_proj: lora_A \[\d+, \d+\] / lora_B \[\d+, \d+\] do not fit the model's \[\d+, \d+\] weight; the adapter was trained on another base model"):
        merge_lora(base, tmp_path / "wide-adapter", tmp_path / "out")
    with pytest.raises(UserError, match="adapter_config.json: missing"):
        merge_lora(base, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = subprocess.run([sys.executable, "tools/merge_lora.py", "--hf-checkpoint", str(base), "--adapter",
                             str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "adapter_config.json" in result.stderr


@pytest.mark.numerics
def test_moe_adapter_from_the_trainer_merges_per_expert(tmp_path, single_process):
    """An adapter our trainer writes for a Qwen3-MoE (per-expert modules) merges into the per-expert
    weights of the checkpoint, and the merged model computes what peft computes with the adapter."""
    from peft import PeftModel

    from slime.backends.megatron_utils.model import initialize_model_and_optimizer
    from slime.utils.arguments import parse_args
    from slime_plugins.lora.peft_io import save_peft_adapter
    from tests._support.adapters import randomize_lora_b_

    base = make_tiny_checkpoint(tmp_path, family="qwen3_moe")
    args = parse_args(["--hf-checkpoint", str(base), "--use-lora", "--lora-r", "4", "--lora-alpha", "8",
                       "--lora-target-modules", "all-linear"])
    built = initialize_model_and_optimizer(args)
    randomize_lora_b_(built.model, std=0.1)
    save_peft_adapter(built.model, built.arch, args.lora, tmp_path / "adapter")
    out = merge_lora(base, tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    base_logits = _logits(hf_base)
    expected = _logits(PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval())
    assert (expected - base_logits).abs().max() > 1e-2
    assert_close(_logits(merged), expected, atol=1e-4, rtol=0, what="MoE: merged vs peft")
