"""train.py end to end at pipeline parallelism 2: two megatron-core stages of a tiny 4-layer model.

The real CLI, Ray, two trainer processes (layers 1-2 and 3-4, LoRA on both) and the built-in
engine.  The engine-vs-trainer log-prob gap holds every step, the adapter the run saves holds
both stages' modules, and peft and a one-stage trainer (``--lora-adapter-path`` at PP=1) compute
the same log-probs with it.
"""

import pytest
from safetensors.torch import load_file

from tests._support.numerics import assert_close
from tests._support.tiny_rl import make_tiny_rl_checkpoint, write_prompts
from tests.test_train import PEFT_LOGPROB_ATOL, chat_tokens, common, rows, run_train, trainer_logprobs


@pytest.fixture(scope="module")
def pp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl-pp")
    ckpt = make_tiny_rl_checkpoint(root, num_hidden_layers=4)
    prompts = write_prompts(root / "train.jsonl", n=64)
    proc = run_train(*common(ckpt, prompts, root), "--use-lora", "--lora-r", 4, "--lora-alpha", 8, "--lr", 1e-2,
                     "--num-rollout", 2, "--global-batch-size", 8, "--use-kl-loss", "--kl-loss-coef", 0.01,
                     "--pipeline-model-parallel-size", 2, "--save", root / "save")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return ckpt, root


def test_every_step_engine_matches_the_pipelined_trainer(pp_run):
    _, root = pp_run
    metrics = [r for r in rows(root / "logs") if r["rollout_id"] >= 0]
    assert [r["rollout_id"] for r in metrics] == [0, 1] and metrics[0]["train/steps"] == 2
    for r in metrics:
        assert_close(r["train/rollout_logprob_abs_diff"], 0.0, atol=1e-5, rtol=0, what="engine vs PP=2 trainer gap")
    assert metrics[1]["train/kl"] > 0


def test_the_saved_adapter_loads_in_peft_and_at_one_stage(pp_run, single_process):
    from tests._support.logprobs import hf_logprobs, peft_logprobs

    ckpt, root = pp_run
    adapter = root / "save" / "adapter"
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in load_file(str(adapter / "adapter_model.safetensors"))}
    assert layers == {0, 1, 2, 3}  # both stages' modules, by global layer index
    tokens = chat_tokens(ckpt, [("what is 3+4?", "7 is 7."), ("what is 9+8?", "17 = 17")])
    in_peft = peft_logprobs(ckpt, adapter, tokens)
    assert (in_peft - hf_logprobs(ckpt, tokens)).abs().max() > 10 * PEFT_LOGPROB_ATOL
    assert_close(in_peft, trainer_logprobs(ckpt, adapter, tokens), atol=PEFT_LOGPROB_ATOL, rtol=0,
                 what="PP=2 adapter: peft vs the trainer at PP=1")
