"""The training actor without Ray, built by its real ``init``: reference = adapters off (one copy of
the weights, counted by storage), the log-prob gap check."""

import dataclasses

import pytest
import torch
from torch import nn

from slime.rollout.batch import RolloutBatch
from tests._support.dist import run_distributed
from tests._support.numerics import SAFETY, UNIT_ROUNDOFF_FP32, arch_tolerance, assert_close, fp32_tolerance
from tests._support.tiny_models import BASE_CONFIG


def _held_storages(root) -> dict[int, int]:
    """``data_ptr -> nbytes`` of every distinct tensor storage reachable from ``root``: through
    nn.Modules (parameters and buffers), lists, tuples, dicts, torch optimizers (groups and state)
    and the attributes of the project's own objects (the actor, its TrainOptimizer, ...).
    Views and tied weights share a storage, so each copy of a weight counts once."""
    storages: dict[int, int] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, nn.Module):
            stack.extend([*obj.parameters(), *obj.buffers()])
        elif isinstance(obj, dict):
            stack.extend([*obj.keys(), *obj.values()])
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            stack.extend([obj.param_groups, obj.state])
        elif type(obj).__module__.startswith(("slime.", "slime_plugins.")) and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return storages


def _init_actor(checkpoint: str, *flags: str, rank: int = 0, world_size: int = 1):
    """A training actor through ``MegatronTrainRayActor.init`` (which joins the parallel state itself)."""
    from slime.backends.megatron_utils.actor import MegatronTrainRayActor
    from slime.utils.arguments import parse_args

    args = parse_args(["--hf-checkpoint", checkpoint, "--use-kl-loss", "--kl-loss-coef", "0.1", "--lr", "1e-3",
                       "--n-samples-per-prompt", "2", "--rollout-batch-size", "2", *flags])
    actor = MegatronTrainRayActor(rank=rank, world_size=world_size)
    actor.init(args)
    return actor


def _rollout_data(vocab: int, seed: int = 0) -> RolloutBatch:
    """Two prompts x two responses of random tokens, with advantages (rollout log-probs left at 0)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (6,), generator=g).tolist()
    other = torch.randint(0, vocab, (4,), generator=g).tolist()
    responses = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 3, 4, 2)]
    tokens = [prompt + responses[0], prompt + responses[1], other + responses[2], other + responses[3]]
    return RolloutBatch(tokens=tokens, prompt_lens=[6, 6, 4, 4], advantages=[1.0, -1.0, 0.5, -0.5],
                        rollout_logprobs=[[0.0] * len(r) for r in responses], group_ids=[0, 0, 1, 1])


def _actor_checks(rank, checkpoint):
    from slime.backends.megatron_utils.packing import collate, group_rows
    from slime.utils.errors import UserError

    # Without LoRA, --use-kl-loss needs a frozen reference copy: the count must see it.
    full = _init_actor(checkpoint)
    full_held_bytes = sum(_held_storages(full).values())
    full_has_reference = full.ref_model is not None
    del full

    actor = _init_actor(checkpoint, "--use-lora", "--lora-r", "8")
    held_bytes = sum(_held_storages(actor).values())
    adapter_bytes = sum(p.numel() * p.element_size() for p in actor.optimizer.params)

    data = _rollout_data(actor.arch.vocab_size)
    mb = collate(group_rows(list(range(4)), data), data)
    with torch.no_grad():
        policy = actor._logprobs(actor.model, mb)[0]
        reference = actor._reference_logprobs(mb)
        logit_scale = actor.model[0](mb.tokens, mb.position_ids, mb.attention_mask).abs().max()
    same_at_init = torch.equal(policy, reference)
    # The training forward (grad enabled) may take other kernels (SDPA picks by grad mode): fp32 rounding.
    gap_atol = arch_tolerance(actor.arch, logit_scale, log_softmax=True)

    # Give the rollout the trainer's own log-probs: the gap is ~0 and training proceeds.
    for local, i in enumerate(mb.index):
        data.rollout_logprobs[i] = policy[mb.sample == local].tolist()
    metrics = actor.train(0, data)
    with torch.no_grad():
        after_policy = actor._logprobs(actor.model, mb)[0]
        after_reference = actor._reference_logprobs(mb)
    # A stale rollout (base model log-probs after an update) must stop the run.
    stale = dataclasses.replace(data, rollout_logprobs=[[v - 0.5 for v in lp] for lp in data.rollout_logprobs])
    try:
        actor.train(1, stale)
        stale_error = None
    except UserError as exc:
        stale_error = str(exc)
    return dict(same_at_init=same_at_init, held_bytes=held_bytes, adapter_bytes=adapter_bytes,
                full_held_bytes=full_held_bytes, full_has_reference=full_has_reference, metrics=metrics,
                ref_unchanged=torch.equal(after_reference, reference), policy_moved=not torch.equal(after_policy, policy),
                stale_error=stale_error, gap_atol=gap_atol)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from safetensors.torch import load_file

    from tests._support.tiny_models import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("actor"))
    weights = load_file(str(checkpoint / "model.safetensors"))
    out = run_distributed(_actor_checks, 1, args=(str(checkpoint),))[0]
    return {**out, "checkpoint_bytes": sum(t.numel() * t.element_size() for t in weights.values())}


def test_reference_is_the_same_model_with_adapters_off(result):
    assert result["same_at_init"]  # B = 0: adapters off == adapters on
    assert result["ref_unchanged"] and result["policy_moved"]
    # One copy of the base weights: everything the LoRA actor holds after init() is the
    # checkpoint's weights once plus the adapters (the optimizer has no state before its first step).
    assert result["held_bytes"] == result["checkpoint_bytes"] + result["adapter_bytes"], result
    # The count does see a second copy: without LoRA, --use-kl-loss builds the frozen reference.
    assert result["full_has_reference"]
    assert result["full_held_bytes"] == 2 * result["checkpoint_bytes"], result


@pytest.mark.numerics
def test_first_update_metrics(result):
    m = result["metrics"]
    assert m["train/kl"] == 0.0
    # the rollout log-probs are the trainer's own, from its no-grad forward
    assert_close(m["train/rollout_logprob_abs_diff"], 0.0, atol=result["gap_atol"], rtol=0,
                 what="gap to the trainer's own log-probs")
    assert m["train/steps"] == 1 and m["train/grad_norm"] > 0 and m["train/entropy"] > 0


def test_stale_rollout_fails_the_run(result):
    assert result["stale_error"] and "--check-logprob-gap" in result["stale_error"]


# Full fine-tuning under TP: every base weight trains, so the TP bookkeeping of base weights is
# exercised (the LoRA runs of tests/test_train.py freeze them).  fp32, same tolerances as there.
PARALLEL_RTOL = 1e-5
PARALLEL_LOSS_ATOL = 1e-7
# The reported grad norm averages the two steps', and step 2's gradient is taken after an AdamW
# update, which normalises every gradient entry (rounding in a tiny entry moves its weight as much
# as a large one): a forward and a backward chain of (layers + 1) reductions each, relative to
# the norm.  Measured up to 1.4e-6 relative (AVX2 kernels): within 10x of a flat 1e-5.
# KL (low_var_kl, exp(r) - 1 - r per token, r = log-ratio to the reference ~ 1e-2 after one small
# step): exp(r) ~ 1 rounds with an absolute error ~u, so the token mean is off by ~u, however small
# the KL itself is (3e-5 here; 2.6e-4 relative seen under ATEN_CPU_CAPABILITY=default).
KL_ATOL = 2 * SAFETY * UNIT_ROUNDOFF_FP32
GRAD_NORM_RTOL = fp32_tolerance(1.0, 2 * (BASE_CONFIG["num_hidden_layers"] + 1),
                                max(BASE_CONFIG["hidden_size"], BASE_CONFIG["intermediate_size"]))


def _full_finetuning_update(rank, checkpoint, tp, sequence_parallel):
    """One rollout's update of full fine-tuning (two clipped AdamW steps, KL to the frozen reference)
    through ``init`` and ``train``.  Returns the metrics and, for the first step, each parameter's
    gradient norm as AdamW receives it (after the DP/SP reductions): whole over TP shards, per
    rank for replicated parameters (replicas must receive the same gradient)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    flags = ["--tensor-model-parallel-size", str(tp), "--global-batch-size", "2", "--check-logprob-gap", "0"]
    actor = _init_actor(checkpoint, *flags, *(["--sequence-parallel"] if sequence_parallel else []),
                        rank=rank, world_size=tp)
    grad_norms: list[dict[str, float]] = []
    grad_norm = actor.optimizer.grad_norm

    def recording_grad_norm() -> float:  # called by step() after the gradient reductions
        if not grad_norms:
            norms = {}
            for name, p in actor.model[0].named_parameters():
                sq = p.grad.detach().double().pow(2).sum()
                if getattr(p, "tensor_model_parallel", False) and tp > 1:
                    dist.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
                norms[name] = float(sq.sqrt())
            grad_norms.append(norms)
        return grad_norm()

    actor.optimizer.grad_norm = recording_grad_norm
    metrics = actor.train(0, _rollout_data(actor.arch.vocab_size))
    return {"metrics": metrics, "grad_norms": grad_norms[0]}


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory):
    """Qwen3 (q/k norms: replicated weights on TP-split heads), odd vocabulary (padded at TP=2)."""
    from tests._support.tiny_models import make_tiny_checkpoint

    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("qwen3"), family="qwen3", head_dim=8, vocab_size=95))


@pytest.fixture(scope="module")
def full_finetuning_tp1(qwen3_checkpoint):
    return run_distributed(_full_finetuning_update, 1, args=(qwen3_checkpoint, 1, False))[0]


@pytest.mark.numerics
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_full_finetuning_tp2_equals_tp1(qwen3_checkpoint, full_finetuning_tp1, sequence_parallel):
    """Each parameter's gradient, the clipped grad norm, loss and KL of a two-step update at TP=2
    (and with sequence parallelism) equal TP=1's."""
    ranks = run_distributed(_full_finetuning_update, 2, args=(qwen3_checkpoint, 2, sequence_parallel))
    reference = full_finetuning_tp1
    assert reference["metrics"]["train/grad_norm"] > 1.0  # clipped at --clip-grad 1: the norm shapes the update
    for name, expected in reference["grad_norms"].items():
        assert expected > 0, name
        for rank, result in enumerate(ranks):
            assert_close(result["grad_norms"][name], expected, rtol=PARALLEL_RTOL, atol=0.0,
                         what=f"rank {rank} gradient norm of {name}")
    assert_close(ranks[0]["metrics"]["train/entropy"], reference["metrics"]["train/entropy"], rtol=PARALLEL_RTOL,
                 atol=0.0, what="train/entropy")
    assert_close(ranks[0]["metrics"]["train/kl"], reference["metrics"]["train/kl"], rtol=PARALLEL_RTOL, atol=KL_ATOL,
                 what="train/kl")
    assert_close(ranks[0]["metrics"]["train/grad_norm"], reference["metrics"]["train/grad_norm"], rtol=GRAD_NORM_RTOL,
                 atol=0.0, what="train/grad_norm")
    assert_close(ranks[0]["metrics"]["train/loss"], reference["metrics"]["train/loss"], rtol=PARALLEL_RTOL,
                 atol=PARALLEL_LOSS_ATOL, what="train/loss")
