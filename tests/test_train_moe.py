"""train.py end to end on a tiny Qwen3-MoE with LoRA on every expert, at expert parallelism 2.

The real CLI, Ray, two megatron-core trainer processes holding two of the four experts each
(allgather token dispatcher over gloo) and the built-in engine (transformers + peft, fused
experts).  Checks the engine-vs-trainer log-prob gap every step, adapter-only sync, the saved
PEFT adapter in peft, the banner's count against ``tools/lora_param_count.py``, and an exact
resume from the earlier checkpoint.
"""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests._support.numerics import assert_close
from tests._support.tiny_rl import make_tiny_rl_checkpoint, write_prompts
from tests.test_train import PEFT_LOGPROB_ATOL, chat_tokens, common, rows, run_train, trainer_logprobs

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
FLAGS = ["--use-lora", "--lora-r", 4, "--lora-alpha", 8, "--lr", 1e-2, "--num-rollout", 2, "--use-kl-loss",
         "--kl-loss-coef", 0.01, "--expert-model-parallel-size", 2, "--actor-num-gpus-per-node", 2,
         "--lora-target-modules", *TARGETS, "--save-interval", 1]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl-moe")
    ckpt = make_tiny_rl_checkpoint(root, family="qwen3_moe")
    prompts = write_prompts(root / "train.jsonl", n=64)
    proc = run_train(*common(ckpt, prompts, root), *FLAGS, "--save", root / "save")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return ckpt, prompts, root, proc


def test_every_step_engine_matches_trainer_and_syncs_adapters_only(moe_run):
    ckpt, _, root, proc = moe_run
    metrics = [r for r in rows(root / "logs") if r["rollout_id"] >= 0]
    assert [r["rollout_id"] for r in metrics] == [0, 1]
    for r in metrics:  # the engine's fused-expert peft model and the trainer's EP=2 experts agree
        assert_close(r["train/rollout_logprob_abs_diff"], 0.0, atol=1e-5, rtol=0, what="engine vs trainer gap")
    assert metrics[0]["train/kl"] == 0.0 and metrics[1]["train/kl"] > 0  # B = 0 at the start, then moved
    adapter = load_file(str(root / "save" / "adapter" / "adapter_model.safetensors"))
    assert metrics[1]["sync/bytes"] == sum(t.numel() * 4 for t in adapter.values())
    experts = {k for k in adapter if ".mlp.experts." in k}
    assert len(experts) == 2 * 4 * 3 * 2  # layers x experts x (gate, up, down) x (A, B): both EP ranks' experts
    assert not any(".mlp.gate." in k for k in adapter)  # the router is not adapted
    config = json.loads((root / "save" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_banner_count_equals_the_count_tool(moe_run):
    ckpt, _, _, proc = moe_run
    from tests.tools.test_lora_param_count import lpc  # the tool, loaded from its file

    banner = int(re.search(r"Trainable parameters: ([\d,]+)", proc.stdout)[1].replace(",", ""))
    config = json.loads((ckpt / "config.json").read_text())
    assert banner == lpc.count_lora_params(config, 4, TARGETS).total
    adapter = load_file(str(moe_run[2] / "save" / "adapter" / "adapter_model.safetensors"))
    fused_a_copies = sum(t.numel() for k, t in adapter.items() if k.endswith(("k_proj.lora_A.weight",
                         "v_proj.lora_A.weight", "up_proj.lora_A.weight")))  # PEFT repeats fused modules' A
    assert banner == sum(t.numel() for t in adapter.values()) - fused_a_copies


def test_saved_adapter_in_peft_gives_the_trainers_logprobs(moe_run, single_process):
    from tests._support.logprobs import hf_logprobs, peft_logprobs

    ckpt, _, root, _ = moe_run
    adapter = root / "save" / "adapter"
    tokens = chat_tokens(ckpt, [("what is 3+4?", "7 is 7."), ("what is 9+8?", "17 = 17")])
    in_peft = peft_logprobs(ckpt, adapter, tokens)
    assert (in_peft - hf_logprobs(ckpt, tokens)).abs().max() > 10 * PEFT_LOGPROB_ATOL  # the adapter has learned
    assert_close(in_peft, trainer_logprobs(ckpt, adapter, tokens), atol=PEFT_LOGPROB_ATOL, rtol=0,
                 what="saved MoE adapter: peft vs trainer")


def test_resume_from_the_first_checkpoint_is_exact(moe_run, tmp_path):
    ckpt, prompts, root, _ = moe_run
    save = tmp_path / "save"
    shutil.copytree(root / "save", save, symlinks=True)
    (save / "latest_checkpointed_iteration.txt").write_text("0")
    proc = run_train(*common(ckpt, prompts, tmp_path), *FLAGS, "--save", save, "--load", save)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    first = [r for r in rows(root / "logs") if r["rollout_id"] == 1][0]
    again = [r for r in rows(tmp_path / "logs") if r["rollout_id"] == 1][0]
    for key in ("train/loss", "train/kl", "train/grad_norm", "rollout/reward_mean"):
        assert again[key] == first[key], key
    for key, value in load_file(str(root / "save" / "adapter" / "adapter_model.safetensors")).items():
        assert torch.equal(load_file(str(save / "adapter" / "adapter_model.safetensors"))[key], value), key
