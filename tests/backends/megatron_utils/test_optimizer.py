"""LR schedule and TrainOptimizer (AdamW + grad norm + clipping) against hand values and torch.optim.AdamW."""

import copy
import math

import pytest
import torch
from torch import nn

from slime.backends.megatron_utils.optimizer import LRSchedule, TrainOptimizer

# --------------------------------------------------------------------------- LRSchedule


def test_constant_schedule_is_flat():
    sched = LRSchedule(lr=3e-4)
    assert [sched(s) for s in (0, 1, 10, 10_000)] == [3e-4] * 4


def test_linear_warmup_reaches_lr_at_its_last_step_then_constant():
    sched = LRSchedule(lr=1.0, warmup_iters=4)
    assert [sched(s) for s in range(7)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])


def test_linear_decay_to_min_lr():
    sched = LRSchedule(lr=1.0, min_lr=0.1, decay_style="linear", decay_iters=10)
    assert sched(0) == pytest.approx(1.0)
    assert sched(5) == pytest.approx(0.55)  # 0.1 + 0.9 * (1 - 5/10)
    assert sched(8) == pytest.approx(0.28)  # 0.1 + 0.9 * 0.2
    assert sched(10) == pytest.approx(0.1)
    assert sched(25) == pytest.approx(0.1)  # stays at min_lr past decay_iters


def test_cosine_decay():
    sched = LRSchedule(lr=1.0, decay_style="cosine", decay_iters=10)
    assert sched(0) == pytest.approx(1.0)
    assert sched(2) == pytest.approx(0.5 * (1 + math.cos(0.2 * math.pi)))  # 0.904508...
    assert sched(2) == pytest.approx(0.9045085, abs=1e-7)
    assert sched(5) == pytest.approx(0.5)
    assert sched(10) == pytest.approx(0.0, abs=1e-12)
    assert sched(15) == pytest.approx(0.0, abs=1e-12)


def test_cosine_decay_to_min_lr():
    sched = LRSchedule(lr=2.0, min_lr=0.5, decay_style="cosine", decay_iters=4)
    assert sched(2) == pytest.approx(1.25)  # 0.5 + 1.5 * 0.5
    assert sched(4) == pytest.approx(0.5)
    assert sched(100) == pytest.approx(0.5)


def test_decay_counts_from_the_end_of_warmup():
    # warm-up over 2 steps, then linear decay over decay_iters - warmup_iters = 10 steps
    sched = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=2, decay_style="linear", decay_iters=12)
    assert [sched(0), sched(1)] == pytest.approx([0.5, 1.0])
    assert sched(2) == pytest.approx(1.0)
    assert sched(7) == pytest.approx(0.55)
    assert sched(12) == pytest.approx(0.1)
    cos = LRSchedule(lr=1.0, warmup_iters=2, decay_style="cosine", decay_iters=12)
    assert cos(7) == pytest.approx(0.5)


@pytest.mark.parametrize("decay_iters", [None, 0])
@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_decay_without_decay_iters_is_constant(style, decay_iters):
    sched = LRSchedule(lr=1e-3, min_lr=1e-5, warmup_iters=2, decay_style=style, decay_iters=decay_iters)
    assert [sched(s) for s in (0, 1, 2, 50, 5000)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3])


# --------------------------------------------------------------------------- TrainOptimizer
# The optimizer asks megatron for its DP / model-parallel groups: use the repository's TP=1,
# single-process parallel state (tests/conftest.py).

needs_parallel_state = pytest.mark.usefixtures("single_process")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.b = nn.Parameter(torch.tensor([[0.5]]))
        self.frozen = nn.Parameter(torch.tensor([3.0]), requires_grad=False)


def _set_grads(model, ga, gb):
    model.a.grad = torch.tensor(ga)
    model.b.grad = torch.tensor(gb)


@needs_parallel_state
def test_only_trainable_parameters_are_optimised():
    model = Tiny()
    opt = TrainOptimizer([model], LRSchedule(lr=0.1))
    in_opt = [p for g in opt.optimizer.param_groups for p in g["params"]]
    assert len(in_opt) == 2 and in_opt[0] is model.a and in_opt[1] is model.b
    _set_grads(model, [1.0, 1.0], [[1.0]])
    opt.step()
    assert model.frozen.item() == 3.0
    assert model.frozen not in opt.optimizer.state


@needs_parallel_state
def test_parameters_of_all_chunks_are_collected():
    first, second = Tiny(), Tiny()
    opt = TrainOptimizer([first, second], LRSchedule(lr=0.1))
    assert [id(p) for p in opt.params] == [id(first.a), id(first.b), id(second.a), id(second.b)]


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(2, 2)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        TrainOptimizer([model], LRSchedule(lr=0.1))


@needs_parallel_state
def test_grad_norm_is_the_global_l2_norm():
    model = Tiny()
    opt = TrainOptimizer([model], LRSchedule(lr=0.1), clip_grad=0.0)
    _set_grads(model, [3.0, 0.0], [[4.0]])
    assert opt.grad_norm() == pytest.approx(5.0)
    model.a.grad = torch.tensor([1.0, -2.0])
    model.b.grad = torch.tensor([[2.0]])
    assert opt.grad_norm() == pytest.approx(3.0)
    big = nn.Linear(7, 5)
    opt_big = TrainOptimizer([big], LRSchedule(lr=0.1))
    (big(torch.randn(3, 7)) ** 2).sum().backward()
    reference = torch.nn.utils.get_total_norm([p.grad for p in big.parameters()], 2.0)
    assert opt_big.grad_norm() == pytest.approx(reference.item(), rel=1e-6)


@needs_parallel_state
def test_parameter_without_grad_is_skipped():
    model = Tiny()
    opt = TrainOptimizer([model], LRSchedule(lr=0.1))
    model.a.grad = torch.tensor([0.0, 0.6])
    model.b.grad = None
    norm, _ = opt.step()
    assert norm == pytest.approx(0.6)
    assert model.b.item() == 0.5  # untouched
    assert model.a[0].item() == 1.0 and model.a[1].item() != -2.0


@needs_parallel_state
def test_clipping_scales_gradients_down_to_clip_grad():
    model = Tiny()
    opt = TrainOptimizer([model], LRSchedule(lr=0.1), clip_grad=1.0)
    _set_grads(model, [3.0, 0.0], [[4.0]])
    norm, _ = opt.step()
    assert norm == pytest.approx(5.0)  # reported before clipping
    assert model.a.grad.tolist() == pytest.approx([0.6, 0.0], rel=1e-5)
    assert model.b.grad.item() == pytest.approx(0.8, rel=1e-5)


@needs_parallel_state
@pytest.mark.parametrize("clip_grad", [10.0, 0.0])
def test_gradients_below_clip_grad_or_without_clipping_are_left_alone(clip_grad):
    model = Tiny()
    opt = TrainOptimizer([model], LRSchedule(lr=0.1), clip_grad=clip_grad)
    _set_grads(model, [3.0, 0.0], [[4.0]])
    norm, _ = opt.step()
    assert norm == pytest.approx(5.0)
    assert model.a.grad.tolist() == [3.0, 0.0] and model.b.grad.tolist() == [[4.0]]


@needs_parallel_state
def test_first_step_hand_value_with_weight_decay():
    # AdamW step 1 (bias-corrected): m_hat = g, v_hat = g^2, so
    # p <- p (1 - lr wd) - lr g / (|g| + eps) = 1.0 * (1 - 0.1 * 0.1) - 0.1 * 1 = 0.89
    # and for g < 0: -2.0 * 0.99 + 0.1 = -1.88
    model = Tiny()
    opt = TrainOptimizer([model], LRSchedule(lr=0.1), weight_decay=0.1, clip_grad=0.0)
    _set_grads(model, [0.5, -0.25], [[2.0]])
    _, lr = opt.step()
    assert lr == pytest.approx(0.1)
    assert model.a.tolist() == pytest.approx([0.89, -1.88], abs=1e-6)
    assert model.b.item() == pytest.approx(0.5 * 0.99 - 0.1, abs=1e-6)


@needs_parallel_state
def test_weight_decay_acts_with_zero_gradient():
    model = Tiny()
    opt = TrainOptimizer([model], LRSchedule(lr=0.5), weight_decay=0.2, clip_grad=0.0)
    _set_grads(model, [0.0, 0.0], [[0.0]])
    opt.step()  # decoupled decay only: p * (1 - 0.5 * 0.2)
    assert model.a.tolist() == pytest.approx([0.9, -1.8], abs=1e-7)
    assert model.b.item() == pytest.approx(0.45, abs=1e-7)


def _grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(2, generator=gen).tolist(), torch.randn(1, 1, generator=gen).tolist()]


@needs_parallel_state
def test_steps_equal_torch_adamw_with_the_same_hyper_parameters():
    model, ref = Tiny(), Tiny()
    opt = TrainOptimizer([model], LRSchedule(lr=0.05), weight_decay=0.01, betas=(0.8, 0.95), eps=1e-6,
                         clip_grad=0.0)
    torch_opt = torch.optim.AdamW([ref.a, ref.b], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01,
                                  fused=False)
    for step in range(4):
        ga, gb = _grads(step)
        _set_grads(model, ga, gb)
        _set_grads(ref, ga, gb)
        opt.step()
        torch_opt.step()
        torch.testing.assert_close(model.a.detach(), ref.a.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(model.b.detach(), ref.b.detach(), rtol=1e-6, atol=1e-7)


@needs_parallel_state
def test_default_betas_are_0_9_and_0_98():
    model, ref = Tiny(), Tiny()
    opt = TrainOptimizer([model], LRSchedule(lr=0.05), clip_grad=0.0)
    torch_opt = torch.optim.AdamW([ref.a, ref.b], lr=0.05, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    for step in range(3):  # betas only show from the second step on
        for m in (model, ref):
            _set_grads(m, *_grads(step))
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(model.a.detach(), ref.a.detach(), rtol=1e-6, atol=1e-7)


@needs_parallel_state
def test_step_follows_the_schedule():
    model = Tiny()
    opt = TrainOptimizer([model], LRSchedule(lr=1.0, warmup_iters=4), clip_grad=0.0)
    lrs = []
    for step in range(5):
        _set_grads(model, *_grads(step))
        _, lr = opt.step()
        lrs.append(lr)
        assert opt.optimizer.param_groups[0]["lr"] == lr
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert opt.step_count == 5


@needs_parallel_state
def test_zero_grad_clears_gradients():
    model = Tiny()
    opt = TrainOptimizer([model], LRSchedule(lr=0.1))
    _set_grads(model, [1.0, 1.0], [[1.0]])
    opt.zero_grad()
    assert model.a.grad is None and model.b.grad is None


@needs_parallel_state
def test_state_dict_round_trip_gives_identical_next_steps():
    sched = LRSchedule(lr=0.1, min_lr=0.01, warmup_iters=1, decay_style="cosine", decay_iters=6)
    kwargs = dict(weight_decay=0.05, clip_grad=1.0)
    model = Tiny()
    opt = TrainOptimizer([model], sched, **kwargs)
    for step in range(3):
        _set_grads(model, *_grads(step))
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    assert state["step_count"] == 3

    resumed, fresh = copy.deepcopy(model), copy.deepcopy(model)
    opt_resumed = TrainOptimizer([resumed], sched, **kwargs)
    opt_resumed.load_state_dict(state)
    opt_fresh = TrainOptimizer([fresh], sched, **kwargs)
    assert opt_resumed.step_count == 3
    for step in range(3, 5):
        for m in (model, resumed, fresh):
            _set_grads(m, *_grads(step))
        _, lr = opt.step()
        _, lr_resumed = opt_resumed.step()
        opt_fresh.step()
        assert lr_resumed == lr
        assert torch.equal(resumed.a, model.a) and torch.equal(resumed.b, model.b)
    # without the state (moments and step count) the same grads lead elsewhere
    assert not torch.equal(fresh.a, model.a)
