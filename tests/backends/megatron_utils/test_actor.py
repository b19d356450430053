"""The training actor without Ray: reference = adapters off (no weight copy), the log-prob gap check."""

import pytest
import torch

from tests._support.dist import run_distributed

CONFIG = dict(architectures=["LlamaForCausalLM"], num_hidden_layers=4, hidden_size=512, intermediate_size=1536,
              num_attention_heads=8, num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False)


def _peak_rss_since_reset(reset: bool = False) -> int:
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _actor_checks(rank):
    import argparse

    from slime.backends.megatron_utils.actor import MegatronTrainRayActor
    from slime.backends.megatron_utils.arch import ModelArch
    from slime.backends.megatron_utils.model import initialize_model_and_optimizer
    from slime.backends.megatron_utils.packing import collate, group_by_prompt
    from slime.utils.arguments import parse_args
    from slime.utils.errors import UserError

    args = parse_args(["--use-lora", "--lora-r", "8", "--use-kl-loss", "--kl-loss-coef", "0.1", "--lr", "1e-3",
                       "--n-samples-per-prompt", "2", "--rollout-batch-size", "2"])
    arch = ModelArch.from_hf_config(CONFIG)
    actor = MegatronTrainRayActor(rank=0, world_size=1)
    actor.args = args
    built = initialize_model_and_optimizer(args, arch=arch)
    actor.model, actor.optimizer, actor.arch, actor.ref_model = built.model, built.optimizer, arch, None
    actor.dp_rank, actor.dp_size, actor.dp_group = 0, 1, None

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 4096, (6,), generator=g).tolist()
    other = torch.randint(0, 4096, (4,), generator=g).tolist()
    responses = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (5, 3, 4, 2)]
    data = dict(tokens=[prompt + responses[0], prompt + responses[1], other + responses[2], other + responses[3]],
                prompt_lens=[6, 6, 4, 4], advantages=[1.0, -1.0, 0.5, -0.5],
                rollout_logprobs=[[0.0] * len(r) for r in responses])
    mb = collate(group_by_prompt(list(range(4)), data), data)
    weight_bytes = sum(p.numel() * p.element_size() for p in actor.model[0].parameters())
    with torch.no_grad():
        policy = actor._logprobs(actor.model, mb)[0]
        baseline = _peak_rss_since_reset(reset=True)
        reference = actor._reference_logprobs(mb)
        ref_peak_growth = _peak_rss_since_reset() - baseline
    same_at_init = torch.equal(policy, reference)

    # Give the rollout the trainer's own log-probs: the gap is ~0 and training proceeds.
    for local, i in enumerate(mb.index):
        data["rollout_logprobs"][i] = policy[mb.sample == local].tolist()
    metrics = actor.train(0, data)
    with torch.no_grad():
        after_policy = actor._logprobs(actor.model, mb)[0]
        after_reference = actor._reference_logprobs(mb)
    # A stale rollout (base model log-probs after an update) must stop the run.
    stale = dict(data, rollout_logprobs=[[v - 0.5 for v in lp] for lp in data["rollout_logprobs"]])
    try:
        actor.train(1, stale)
        stale_error = None
    except UserError as exc:
        stale_error = str(exc)
    return dict(same_at_init=same_at_init, ref_growth=ref_peak_growth, weight_bytes=weight_bytes, metrics=metrics,
                ref_unchanged=torch.equal(after_reference, reference), policy_moved=not torch.equal(after_policy, policy),
                stale_error=stale_error)


@pytest.fixture(scope="module")
def result():
    return run_distributed(_actor_checks, 1)[0]


def test_reference_is_the_same_model_with_adapters_off(result):
    assert result["same_at_init"]  # B = 0: adapters off == adapters on
    assert result["ref_unchanged"] and result["policy_moved"]
    # no second copy of the weights: the reference forward's peak growth is far below the weights' size
    assert result["ref_growth"] < 0.25 * result["weight_bytes"], (result["ref_growth"], result["weight_bytes"])


def test_first_update_metrics(result):
    m = result["metrics"]
    assert m["train/kl"] == 0.0
    assert m["train/rollout_logprob_abs_diff"] < 1e-6
    assert m["train/steps"] == 1 and m["train/grad_norm"] > 0 and m["train/entropy"] > 0


def test_stale_rollout_fails_the_run(result):
    assert result["stale_error"] and "--check-logprob-gap" in result["stale_error"]
