"""LoRA inside a real megatron-core GPTModel: freezing, optimizer contents, banner, TP=2 == TP=1."""

import pytest
import torch

from tests._support.dist import run_distributed
from tests._support.numerics import assert_close

TINY = dict(architectures=["Qwen3ForCausalLM"], num_hidden_layers=2, hidden_size=64, intermediate_size=96,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=256, tie_word_embeddings=False)
TARGETS = {"column": ["linear_qkv", "linear_fc1"], "row": ["linear_proj", "linear_fc2"]}


def _build(flags):
    from slime.backends.megatron_utils.arch import ModelArch
    from slime.backends.megatron_utils.model import initialize_model_and_optimizer
    from slime.utils.arguments import parse_args

    torch.manual_seed(0)
    return initialize_model_and_optimizer(parse_args(flags), arch=ModelArch.from_hf_config(TINY))


def _train_three_steps(rank, tp):
    """Per target kind: full logits, then (loss, grad norm) of three optimizer steps."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    results = {}
    for kind, targets in TARGETS.items():
        built = _build(["--use-lora", "--lora-r", "4", "--lr", "5e-2", "--tensor-model-parallel-size", str(tp),
                        "--lora-target-modules", *targets])
        model, opt = built.model[0], built.optimizer
        gen = torch.Generator().manual_seed(7)
        ids = torch.randint(0, 256, (2, 12), generator=gen)
        pos = torch.arange(12).expand(2, -1)
        with torch.no_grad():
            logits = gather_from_tensor_model_parallel_region(model(ids, pos, None))
        steps = []
        for _ in range(3):
            opt.zero_grad()
            loss = model(ids, pos, None, labels=ids).mean()
            loss.backward()
            norm, _ = opt.step()
            steps.append((loss.item(), norm))
        results[kind] = (logits, steps)
    return results


@pytest.fixture(scope="module")
def tp_runs():
    return run_distributed(_train_three_steps, 1, args=(1,))[0], run_distributed(_train_three_steps, 2, args=(2,))


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["column", "row"])
def test_tp2_equals_tp1(tp_runs, kind):
    tp1, tp2 = tp_runs
    logits1, steps1 = tp1[kind]
    for rank_result in tp2:
        logits2, steps2 = rank_result[kind]
        assert_close(logits2, logits1, rtol=1e-5, atol=1e-5, what=f"{kind}: TP=2 vs TP=1 logits")
        for step, ((l1, g1), (l2, g2)) in enumerate(zip(steps1, steps2)):
            assert_close(l2, l1, rtol=1e-5, atol=0, what=f"{kind}: TP=2 vs TP=1 loss, step {step}")
            assert_close(g2, g1, rtol=1e-5, atol=0, what=f"{kind}: TP=2 vs TP=1 grad norm, step {step}")
    losses = [l for l, _ in steps1]
    assert losses[-1] < losses[0]


def _inspect(rank, flags):
    built = _build(flags)
    model, opt = built.model[0], built.optimizer
    lora = {id(p) for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    in_opt = {id(p) for group in opt.optimizer.param_groups for p in group["params"]}
    device = next(model.parameters()).device  # CUDA on a GPU machine
    ids = torch.randint(0, 256, (2, 8)).to(device)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    for _ in range(2):
        opt.zero_grad()
        model(ids, torch.arange(8, device=device).expand(2, -1), None, labels=ids).mean().backward()
        frozen_grads = [n for n, p in model.named_parameters() if "lora_" not in n and p.grad is not None]
        opt.step()
    changed = [n for n, p in model.named_parameters() if "lora_" not in n and not torch.equal(p, before[n])]
    state_for_frozen = [p for p in opt.optimizer.state if id(p) not in lora]
    from slime_plugins.lora.lora_layer import LoRALinear

    writable = {m.base_layer.__class__.__name__: m._output_writable for m in model.modules() if isinstance(m, LoRALinear)}
    return dict(lora=len(lora), in_opt=len(in_opt), same=lora == in_opt, frozen_grads=frozen_grads,
                changed=changed, state_for_frozen=len(state_for_frozen), writable=writable,
                fused_adamw=opt.optimizer.defaults["fused"])


def test_optimizer_holds_exactly_the_lora_parameters_and_base_is_untouched():
    (result,) = run_distributed(_inspect, 1, args=(["--use-lora", "--lora-r", "4", "--lr", "1e-2"],))
    assert result["same"] and result["lora"] == 2 * 4 * 2  # A and B x 4 targets x 2 layers
    assert result["frozen_grads"] == [] and result["changed"] == [] and result["state_for_frozen"] == 0
    # megatron's parallel linears get the adapter update written into their output
    assert result["writable"] == {"ColumnParallelLinear": True, "RowParallelLinear": True}
    assert result["fused_adamw"] is True


def test_no_lora_only_trainable_trains_the_base_too():
    (result,) = run_distributed(_inspect, 1, args=(["--use-lora", "--no-lora-only-trainable", "--lr", "1e-2"],))
    assert not result["same"] and result["in_opt"] > result["lora"] and result["changed"]
